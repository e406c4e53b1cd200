"""The rules' input functions (duplus.workflow_inputs): what makes Snakemake rerun a stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from duplus import workflow_inputs

ROOT = Path(__file__).resolve().parents[1]


def make_config(tmp_path: Path, dataset: str, table: str | None = None) -> dict:
    return {"paths": {"raw": str(tmp_path / "raw"), "preprocessed": str(tmp_path / "pre"),
                      "results": str(tmp_path / "results")}, "prompts": {"encoder": "minilm"},
            "datasets": {dataset: {}}, "prognosis": {"dataset": dataset, "ehr": {"table": table}}}


IMAGE_INPUTS = {"prompts": Path("prompts/minilm.safetensors"), "model": Path("pretrain/model.safetensors")}


def image_inputs(tmp_path: Path) -> dict:
    return {key: tmp_path / "results" / path for key, path in IMAGE_INPUTS.items()}


def place_table(tmp_path: Path, dataset: str) -> Path:
    path = tmp_path / "raw" / dataset / "clinical.csv"
    path.parent.mkdir(parents=True)
    path.write_text("patient_id\n")
    return path


def test_a_named_table_is_an_input(tmp_path):
    inputs = workflow_inputs.prognosis_inputs(make_config(tmp_path, "hecktor2022_pet", table="ehr.csv"))
    assert inputs == {"manifests": [tmp_path / "pre" / "hecktor2022_pet" / "manifest.csv"], "ehr": "ehr.csv",
                      **image_inputs(tmp_path)}


def test_prognosis_on_the_ct_and_the_pet_needs_both_manifests(tmp_path):
    """prognosis.dataset as a list: every listed dataset's manifest is an input, and the default table
    is the one placement's that both HECKTOR datasets read."""
    config = make_config(tmp_path, "hecktor2022_ct")
    config["datasets"]["hecktor2022_pet"] = {}
    config["prognosis"]["dataset"] = ["hecktor2022_ct", "hecktor2022_pet"]
    assert workflow_inputs.prognosis_inputs(config) == {
        "manifests": [tmp_path / "pre" / name / "manifest.csv" for name in ("hecktor2022_ct", "hecktor2022_pet")],
        **image_inputs(tmp_path)}
    clinical = place_table(tmp_path, "hecktor2022")
    assert workflow_inputs.prognosis_inputs(config)["ehr"] == clinical


def test_an_ehr_only_run_needs_the_table_alone(tmp_path):
    """prognosis.dataset: null: no manifest, prompts or pretrained model (no pretraining for a table)."""
    config = make_config(tmp_path, "hecktor2022_pet", table="ehr.csv")
    config["prognosis"]["dataset"] = None
    assert workflow_inputs.prognosis_inputs(config) == {"ehr": "ehr.csv"}


def test_the_default_table_put_in_place_by_hand_is_an_input(tmp_path):
    config = make_config(tmp_path, "hecktor2022_pet")
    assert "ehr" not in workflow_inputs.prognosis_inputs(config)  # not there yet: the stage says so itself
    clinical = place_table(tmp_path, "hecktor2022")  # the one placement the CT and the PET dataset read
    assert workflow_inputs.prognosis_inputs(config)["ehr"] == clinical


def test_a_table_the_download_writes_is_not_an_input(tmp_path):
    dataset = "demo_headneck_pet"
    # It appears during the first run; an input that appears between runs would rerun prognosis
    # once for nothing (the download record, upstream of the manifest, covers it).
    place_table(tmp_path, dataset)
    assert workflow_inputs.prognosis_inputs(make_config(tmp_path, dataset)) == {
        "manifests": [tmp_path / "pre" / dataset / "manifest.csv"], **image_inputs(tmp_path)}


def user_dataset(tmp_path: Path, kind: str) -> tuple[dict, Path]:
    tmp_path.mkdir()
    root = tmp_path / ("cases.csv" if kind == "csv" else "msd")
    if kind == "csv":
        root.write_text("image,label\n")
    else:
        root.mkdir()
    settings = {"kind": kind, "root": str(root), "modality": "CT", "region": "abdomen", "labels": {"1": "liver"}}
    return {"datasets": {"mine": settings, "demo_abdomen_ct": {}}}, root


def test_the_file_listing_a_user_datasets_cases_is_an_input_of_its_download(tmp_path):
    config, table = user_dataset(tmp_path / "csv", "csv")
    index = workflow_inputs.user_dataset_index
    assert index("mine", config) == [table]                    # an edited row reruns the download
    assert index("demo_abdomen_ct", config) == []              # built-in: its files do not change

    config, folder = user_dataset(tmp_path / "msd", "msd")
    assert index("mine", config) == []                         # no dataset.json: cases come from imagesTr/
    (folder / "dataset.json").write_text("{}")
    assert index("mine", config) == [folder / "dataset.json"]  # a case added to it reruns the download


def test_the_report_declares_every_file_it_reads_that_a_rule_writes(tmp_path):
    config = {"paths": {"raw": "raw", "preprocessed": "pre", "results": "results"}, "datasets": {"d": {}},
              "prompts": {"encoder": "minilm"}, "lora": {"enabled": True, "centers": {"c": {}}},
              "prognosis": {"enabled": True}, "baseline": {"enabled": False}}
    inputs = workflow_inputs.report_inputs(config)
    declared = {str(path) for value in inputs.values() for path in (value if isinstance(value, list) else [value])}
    # Read by duplus.report.inputs and its provenance, written by pretrain, evaluate, prognosis, cache_prompts.
    assert {"results/pretrain/model.json", "results/evaluate/universal/examples",
            "results/evaluate/universal/per_case.csv", "results/evaluate/universal/efficiency.json",
            "results/prognosis/folds.csv", "results/prognosis/km.json", "results/prompts/minilm.json",
            "results/lora/c/metrics.json"} <= declared


def demo_config() -> dict:
    """config.yaml as the Snakefile sees it: the schema's defaults filled in."""
    from snakemake.utils import validate

    from duplus.data.registry import drop_removed_entries, stringify_label_ids

    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    drop_removed_entries(config)
    stringify_label_ids(config)
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    return config


def planned_inputs(workdir: Path) -> dict[str, set[str]]:
    """The inputs of every job of `snakemake -n all` on the demo config, by rule (jobs of one rule merged)."""
    dry = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"), "-n", "all",
                          "--directory", str(workdir)], capture_output=True, text=True, encoding="utf-8",
                         errors="replace", cwd=ROOT, env=dict(os.environ, DUPLUS_NO_PROGRESS="1"))
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    inputs: dict[str, set[str]] = {}
    rule = ""
    for line in dry.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[-1].rstrip(":")
            inputs.setdefault(rule, set())
        elif line.strip().startswith("input: "):
            inputs[rule] |= set(line.strip().removeprefix("input: ").split(", "))
    return inputs


def flat(values) -> set[str]:
    found: set[str] = set()
    for value in values:
        found |= {str(path) for path in value} if isinstance(value, list) else {str(value)}
    return found


def test_the_snakefile_plans_the_inputs_the_library_gives(tmp_path):
    """rules/common.smk binds the run's config to duplus.workflow_inputs: a dry run of the demo lists,
    for the jobs whose inputs are functions, the files these functions return."""
    config = demo_config()
    planned = planned_inputs(tmp_path)
    assert planned["report"] == flat(workflow_inputs.report_inputs(config).values())
    assert planned["prognosis"] == flat(workflow_inputs.prognosis_inputs(config).values())
    assert planned["lora_center"] == flat([workflow_inputs.all_manifests(config), workflow_inputs.prompt_cache(config),
                                           workflow_inputs.pretrained_model(config)])
    assert planned["preprocess"] == {str(workflow_inputs.download_record(name, config))
                                     for name in workflow_inputs.dataset_names(config)}
    assert planned["download"] == set()  # built-in datasets: no file lists their cases

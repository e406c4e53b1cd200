"""Input functions of rules/common.smk: what makes Snakemake rerun a stage."""

from __future__ import annotations

from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "rules" / "common.smk"


def input_functions(config: dict) -> dict:
    """rules/common.smk holds plain Python functions that read a global ``config``."""
    namespace = {"config": config}
    exec(compile(COMMON.read_text(encoding="utf-8"), str(COMMON), "exec"), namespace)
    return namespace


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
    inputs = input_functions(make_config(tmp_path, "hecktor2022_pet", table="ehr.csv"))["prognosis_inputs"]()
    assert inputs == {"manifests": [tmp_path / "pre" / "hecktor2022_pet" / "manifest.csv"], "ehr": "ehr.csv",
                      **image_inputs(tmp_path)}


def test_prognosis_on_the_ct_and_the_pet_needs_both_manifests(tmp_path):
    """prognosis.dataset as a list: every listed dataset's manifest is an input, and the default table
    is the one placement's that both HECKTOR datasets read."""
    config = make_config(tmp_path, "hecktor2022_ct")
    config["datasets"]["hecktor2022_pet"] = {}
    config["prognosis"]["dataset"] = ["hecktor2022_ct", "hecktor2022_pet"]
    functions = input_functions(config)
    assert functions["prognosis_inputs"]() == {
        "manifests": [tmp_path / "pre" / name / "manifest.csv" for name in ("hecktor2022_ct", "hecktor2022_pet")],
        **image_inputs(tmp_path)}
    clinical = place_table(tmp_path, "hecktor2022")
    assert functions["prognosis_inputs"]()["ehr"] == clinical


def test_an_ehr_only_run_needs_the_table_alone(tmp_path):
    """prognosis.dataset: null: no manifest, prompts or pretrained model (no pretraining for a table)."""
    config = make_config(tmp_path, "hecktor2022_pet", table="ehr.csv")
    config["prognosis"]["dataset"] = None
    assert input_functions(config)["prognosis_inputs"]() == {"ehr": "ehr.csv"}


def test_the_default_table_put_in_place_by_hand_is_an_input(tmp_path):
    functions = input_functions(make_config(tmp_path, "hecktor2022_pet"))
    assert "ehr" not in functions["prognosis_inputs"]()       # not there yet: the stage says so itself
    clinical = place_table(tmp_path, "hecktor2022")  # the one placement the CT and the PET dataset read
    assert functions["prognosis_inputs"]()["ehr"] == clinical


def test_a_table_the_download_writes_is_not_an_input(tmp_path):
    dataset = "demo_headneck_pet"
    # It appears during the first run; an input that appears between runs would rerun prognosis
    # once for nothing (the download record, upstream of the manifest, covers it).
    place_table(tmp_path, dataset)
    assert input_functions(make_config(tmp_path, dataset))["prognosis_inputs"]() == {
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


class Wildcards:
    def __init__(self, dataset: str) -> None:
        self.dataset = dataset


def test_the_file_listing_a_user_datasets_cases_is_an_input_of_its_download(tmp_path):
    config, table = user_dataset(tmp_path / "csv", "csv")
    index = input_functions(config)["user_dataset_index"]
    assert index(Wildcards("mine")) == [table]                 # an edited row reruns the download
    assert index(Wildcards("demo_abdomen_ct")) == []           # built-in: its files do not change

    config, folder = user_dataset(tmp_path / "msd", "msd")
    index = input_functions(config)["user_dataset_index"]
    assert index(Wildcards("mine")) == []                      # no dataset.json: cases come from imagesTr/
    (folder / "dataset.json").write_text("{}")
    assert index(Wildcards("mine")) == [folder / "dataset.json"]  # a case added to it reruns the download


def test_the_report_declares_every_file_it_reads_that_a_rule_writes(tmp_path):
    config = {"paths": {"raw": "raw", "preprocessed": "pre", "results": "results"}, "datasets": {"d": {}},
              "prompts": {"encoder": "minilm"}, "lora": {"enabled": True, "centers": {"c": {}}},
              "prognosis": {"enabled": True}, "baseline": {"enabled": False}}
    inputs = input_functions(config)["report_inputs"]()
    declared = {str(path) for value in inputs.values() for path in (value if isinstance(value, list) else [value])}
    # Read by duplus.report.inputs and its provenance, written by pretrain, evaluate, prognosis, cache_prompts.
    assert {"results/pretrain/model.json", "results/evaluate/universal/examples",
            "results/evaluate/universal/per_case.csv", "results/evaluate/universal/efficiency.json",
            "results/prognosis/folds.csv", "results/prognosis/km.json", "results/prompts/minilm.json",
            "results/lora/c/metrics.json"} <= declared

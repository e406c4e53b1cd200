"""The whole demo pipeline through Snakemake on a tiny config: outputs exist, metrics are sane."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TINY = ROOT / "tests" / "integration" / "config_tiny.yaml"

pytestmark = pytest.mark.integration


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(ROOT / "config.yaml"), str(TINY), "--cores", "2", *args]
    env = dict(os.environ, DUPLUS_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("pipeline")
    snakemake(workdir, "all")
    return workdir


def test_every_stage_writes_its_outputs(finished_run: Path) -> None:
    results = finished_run / "results"
    for relative in [
        "prompts/minilm.safetensors",
        "pretrain/model.safetensors",
        "pretrain/train_log.csv",
        "evaluate/universal/summary.csv",
        "evaluate/universal/per_case.csv",
        "evaluate/baseline/summary.csv",
        "baseline/demo_abdomen_ct/model.safetensors",
        "lora/ct_siteB/metrics.json",
        "prognosis/summary.csv",
        "report/index.html",
    ]:
        assert (results / relative).is_file(), relative
    for dataset in ["demo_abdomen_ct", "demo_abdomen_mri", "demo_headneck_pet"]:
        assert (finished_run / "data" / "preprocessed" / dataset / "manifest.csv").is_file()


def test_metrics_are_sane_numbers(finished_run: Path) -> None:
    results = finished_run / "results"
    summary = pd.read_csv(results / "evaluate/universal/summary.csv")
    means = summary[summary["class"] == "mean"]
    assert set(means["dataset"]) == {"demo_abdomen_ct", "demo_abdomen_mri", "demo_headneck_pet"}
    assert means["dice"].between(0, 1).all()
    baseline = pd.read_csv(results / "evaluate/baseline/summary.csv")
    # Each baseline is scored on its own dataset's classes, exactly as the universal model.
    assert set(baseline["dataset"]) == set(means["dataset"])
    assert set(zip(baseline["dataset"], baseline["class"])) == set(zip(summary["dataset"], summary["class"]))
    baseline_log = pd.read_csv(results / "baseline/demo_abdomen_ct/train_log.csv")
    assert baseline_log["step"].iloc[-1] == 16 // 3  # an equal share of the universal budget
    assert "baseline Dice" in (results / "report/index.html").read_text(encoding="utf-8")
    log = pd.read_csv(results / "pretrain/train_log.csv")
    assert log["loss"].notna().all() and (log["loss"] > 0).all()
    lora = json.loads((results / "lora/ct_siteB/metrics.json").read_text(encoding="utf-8"))
    for key in ("zero_shot_dice", "lora_dice", "full_ft_dice"):
        assert 0.0 <= lora[key] <= 1.0
    assert lora["trainable_params_lora"] < lora["trainable_params_full"]
    prognosis = pd.read_csv(results / "prognosis/summary.csv")
    assert "ehr_coxph" in set(prognosis["model"])
    assert prognosis["harrell_c_mean"].dropna().between(0, 1).all()


def test_rerunning_one_stage_reruns_nothing_upstream(finished_run: Path) -> None:
    for target in ("lora_finetune", "preprocess_all"):
        dry = snakemake(finished_run, "-n", target)
        assert "Nothing to be done" in dry.stdout + dry.stderr, target
    # Targets before --forcerun, which would read them as more rules to force.
    forced = snakemake(finished_run, "-n", "preprocess_all", "--forcerun", "preprocess")
    assert "rule preprocess:" in forced.stdout + forced.stderr and "rule universal_pretrain:" not in forced.stdout
    forced = snakemake(finished_run, "-n", "lora_finetune", "--forcerun", "lora_center")
    text = forced.stdout + forced.stderr
    for upstream in ("download", "preprocess", "cache_prompts", "universal_pretrain"):
        assert f"rule {upstream}:" not in text


def test_a_changed_setting_reruns_the_stages_it_affects_and_no_others(finished_run: Path, tmp_path: Path) -> None:
    def planned(override: str) -> set[str]:
        extra = tmp_path / "override.yaml"
        extra.write_text(override)
        command = [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(finished_run), "--configfile",
                   str(ROOT / "config.yaml"), str(TINY), str(extra), "--cores", "1", "-n", "all"]
        dry = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace")
        assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
        return {line.split()[-1].rstrip(":") for line in dry.stdout.splitlines() if line.startswith(("rule ", "localrule "))}

    assert planned("lora:\n  steps: 7\n") == {"lora_center", "report", "all"}
    assert planned("evaluate:\n  max_cases_per_dataset: 1\n  nsd_tolerance_mm: 3.0\n") >= {"evaluate", "baseline_evaluate"}
    assert "universal_pretrain" not in planned("evaluate:\n  max_cases_per_dataset: 1\n  nsd_tolerance_mm: 3.0\n")
    # Speed-only settings restart nothing.
    assert planned("pretrain:\n  num_workers: 1\n  compile: false\ninference:\n  sw_batch_size: 1\n") == set()


def test_misspelled_config_key_fails_before_any_job(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  stepz: 3\n")
    result = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile",
         str(ROOT / "config.yaml"), str(bad), "--cores", "1", "all"],
        capture_output=True, text=True, encoding="utf-8", errors="replace",
    )
    assert result.returncode != 0
    assert "stepz" in result.stdout + result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  steps: many\n")
    result = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile",
         str(ROOT / "config.yaml"), str(bad), "--cores", "1", "-n", "all"],
        capture_output=True, text=True, encoding="utf-8", errors="replace",
    )
    assert result.returncode != 0
    assert "steps" in result.stdout + result.stderr and "many" in result.stdout + result.stderr


def test_the_readme_own_data_example_validates_with_integer_label_ids(tmp_path: Path) -> None:
    from duplus.demo.generate import generate_demo  # any MSD-style folder will do

    folder = tmp_path / "my_liver_ct"
    generate_demo("demo_abdomen_ct", {}, folder)
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"datasets:\n  my_liver_ct:\n    kind: msd\n    root: {folder}\n    modality: CT\n"
                    f"    region: abdomen\n    labels: {{1: liver, 2: liver tumour}}\n")
    result = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile",
         str(ROOT / "config.yaml"), str(mine), "--cores", "1", "-n", "all"],
        capture_output=True, text=True, encoding="utf-8", errors="replace",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "my_liver_ct" in result.stdout


def test_lint_and_dry_run_list_every_stage() -> None:
    lint = subprocess.run([SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--lint"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=ROOT)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    dry = subprocess.run([SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-n", "all", "--directory", "/tmp/duplus-dry"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    for stage in ("download", "preprocess", "cache_prompts", "universal_pretrain", "lora_center", "prognosis", "report"):
        assert stage in dry.stdout
    shutil.rmtree("/tmp/duplus-dry", ignore_errors=True)


def test_segment_with_a_center_adapter_writes_on_the_input_grid(finished_run: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    raw = sorted((finished_run / "data/raw/demo_abdomen_ct/imagesTr").glob("*siteB*.nii.gz"))[0]
    out = tmp_path / "seg"
    duplus = str(Path(sys.executable).with_name("duplus"))
    result = subprocess.run(
        [duplus, "segment", "-i", str(raw), "-o", str(out), "--prompts", "liver, hepatic tumour",
         "--modality", "CT", "--region", "abdomen",
         "--weights", str(finished_run / "results/pretrain/model.safetensors"),
         "--prompt-cache", str(finished_run / "results/prompts/minilm.safetensors"),
         "--adapter", str(finished_run / "results/lora/ct_siteB"), "--device", "cpu"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=finished_run,
        env=dict(os.environ, DUPLUS_NO_PROGRESS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    image = sitk.ReadImage(str(raw))
    written = sorted(out.glob("*.nii.gz"))
    assert {p.name for p in written} == {"liver.nii.gz", "liver_tumor.nii.gz"}
    for path in written:
        mask = sitk.ReadImage(str(path))
        assert mask.GetSize() == image.GetSize()
        assert mask.GetSpacing() == pytest.approx(image.GetSpacing())
        assert mask.GetOrigin() == pytest.approx(image.GetOrigin())
        assert mask.GetDirection() == pytest.approx(image.GetDirection())
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["adapter"]


def test_rerunning_the_report_touches_only_report_outputs(finished_run: Path) -> None:
    results = finished_run / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file() and "report" not in p.parts}
    snakemake(finished_run, "--forcerun", "report", "report")
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file() and "report" not in p.parts}
    assert before == after
    assert (results / "report" / "index.html").is_file()

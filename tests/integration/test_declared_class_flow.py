"""A class of the user's own, through every stage that names it: a generated brain-MRI folder whose config
declares two classes; prompts, preprocessing, a short pretraining, evaluation and the report, each called
through the library as its Snakemake rule calls it; then `duplus segment` with the weights alone, in a
fresh process's taxonomy and without a config, names the classes by name and by synonym.

The network is tiny and trains for four steps: the test checks that the classes flow, not that they are learnt.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from duplus.cli import main
from duplus.data import taxonomy
from duplus.data.download import run_download
from duplus.data.preprocess import run_preprocess
from duplus.evaluate.evaluate_stage import run_evaluate
from duplus.model import read_sidecar
from duplus.prompts.cache import PromptCache, run_cache_prompts
from duplus.report.build import run_report
from duplus.stage import declare_config_classes
from duplus.train.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[2]
CAUDATE_TEXT = "A T1-weighted Magnetic Resonance Imaging scan of a left caudate nucleus."
HIPPOCAMPUS_TEXT = "A T1-weighted Magnetic Resonance Imaging scan showing the left hippocampus."
CLASSES = {
    "Left Caudate": {"synonyms": ["caudate l"], "prompt": "left caudate nucleus"},
    "left hippocampus": {"parent": "hippocampus", "prompt": "A {scan} showing the left hippocampus."},
}


def brain_folder(root: Path, cases: int = 4) -> Path:
    """MRI-like volumes whose labels hold two small structures (11, 17) among regions not asked for."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shape = (20, 24, 24)
    z, y, x = np.indices(shape)
    for index in range(cases):
        rng = np.random.default_rng(index)
        brain = ((z - 10) / 9) ** 2 + ((y - 12) / 11) ** 2 + ((x - 12) / 11) ** 2 <= 1
        label = np.where(brain, 2, 0).astype(np.uint8)  # white matter: background to this run
        label[(abs(z - 10) <= 2) & (abs(y - 9) <= 2) & (abs(x - 7) <= 2)] = 11
        label[(abs(z - 10) <= 2) & (abs(y - 14) <= 2) & (abs(x - 17) <= 2)] = 17
        image = np.where(brain, 300.0, 5.0) + 200.0 * np.isin(label, (11, 17)) + rng.normal(0, 10, shape)
        for array, folder in ((image.astype(np.float32), "imagesTr"), (label, "labelsTr")):
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing((4.0, 4.0, 4.0))
            sitk.WriteImage(volume, str(root / folder / f"sub{index}.nii.gz"))
    listing = [{"image": f"./imagesTr/sub{i}.nii.gz", "label": f"./labelsTr/sub{i}.nii.gz"} for i in range(cases)]
    (root / "dataset.json").write_text(json.dumps({"name": "my_brain", "training": listing}))
    return root


def run_config(work: Path, data: Path) -> dict:
    """The demo's config.yaml with this dataset alone, small sizes, and no LoRA, baseline or prognosis."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    config["paths"] = {key: str(work / key) for key in ("raw", "preprocessed", "results", "logs")}
    config["device"] = "cpu"
    config["datasets"] = {"my_brain": {"kind": "msd", "root": str(data), "modality": "MRI", "sequence": "T1",
                                       "region": "brain", "labels": {11: "left caudate", 17: "left hippocampus"},
                                       "classes": copy.deepcopy(CLASSES)}}
    config["preprocess"]["spacing"] = [4.0, 4.0, 4.0]
    config["pretrain"].update(steps=4, patch_size=[16, 16, 16], checkpoint_every=4, log_every=2, warmup_steps=1,
                              exclude_centers={})
    config["inference"]["overlap"] = 0.25
    config["lora"] = {**config["lora"], "enabled": False, "centers": {}}
    config["baseline"] = {**config.get("baseline", {}), "enabled": False}
    config["prognosis"] = {**config["prognosis"], "enabled": False}
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every stage of a run on the folder, in the order of its rules."""
    work = tmp_path_factory.mktemp("declared")
    data = brain_folder(work / "my_brain")
    config = run_config(work, data)
    raw, results = work / "raw" / "my_brain", work / "results"
    record = raw / "download.json"
    cache = results / "prompts" / "minilm.safetensors"
    manifest = work / "preprocessed" / "my_brain" / "manifest.csv"
    model = results / "pretrain" / "model.safetensors"

    def stage(func, **kwargs):
        # Each rule's job is a new process that knows the config's classes only from its config (run_stage).
        taxonomy.declare_classes([])
        declare_config_classes({"config": config})
        return func(config=config, **kwargs)

    stage(run_download, dataset="my_brain", out_record=record)
    stage(run_cache_prompts, out_cache=cache)
    stage(run_preprocess, dataset="my_brain", download_record=record, out_manifest=manifest, threads=1)
    stage(run_pretrain, manifests=[manifest], prompt_cache=cache, out_model=model,
          out_log=results / "pretrain" / "train_log.csv")
    stage(run_evaluate, manifests=[str(manifest)], prompt_cache=str(cache), model_path=str(model),
          out_dir=str(results / "evaluate" / "universal"))
    stage(run_report, results_dir=results, out_dir=results / "report")
    taxonomy.declare_classes([])  # what `duplus segment` starts from: the built-in classes only
    return {"work": work, "data": data, "cache": cache, "model": model, "results": results, "manifest": manifest}


def test_the_declared_classes_are_prompted_trained_and_recorded_with_the_weights(trained: dict) -> None:
    texts = set(PromptCache.load(trained["cache"]).texts)
    assert {CAUDATE_TEXT, HIPPOCAMPUS_TEXT} <= texts
    labels = json.loads(pd.read_csv(trained["manifest"])["labels"][0])
    assert labels == {"11": "left caudate", "17": "left hippocampus"}
    sidecar = read_sidecar(trained["model"])
    assert sidecar["classes"] == {"my_brain": ["left caudate", "left hippocampus"]}
    assert sidecar["dataset_scans"] == {"my_brain": {"modality": "MRI", "region": "brain"}}
    assert sidecar["declared_classes"] == [
        {"name": "left caudate", "region": "brain", "parent": None, "synonyms": ["caudate l"],
         "prompt": "left caudate nucleus"},
        {"name": "left hippocampus", "region": "brain", "parent": "hippocampus", "synonyms": [],
         "prompt": "A {scan} showing the left hippocampus."},
    ]


def test_evaluation_and_report_list_the_declared_classes_with_their_metrics(trained: dict) -> None:
    evaluated = trained["results"] / "evaluate" / "universal"
    summary = pd.read_csv(evaluated / "summary.csv")
    rows = summary[summary["dataset"] == "my_brain"].set_index("class")
    assert {"left caudate", "left hippocampus", "mean"} <= set(rows.index)
    for name in ("left caudate", "left hippocampus"):
        assert 0.0 <= rows.loc[name, "dice"] <= 1.0 and rows.loc[name, "n"] >= 1
    per_case = pd.read_csv(evaluated / "per_case.csv")
    assert set(per_case["class"]) == {"left caudate", "left hippocampus"}
    # Table 1 counts the dataset's two classes; its per-class table has a row of each, with the summary's Dice.
    tables = trained["results"] / "report" / "tables"
    table1 = pd.read_csv(tables / "table1_segmentation.csv", dtype=str).set_index("dataset")
    assert table1.loc["my_brain", "classes"] == "2"
    per_class = pd.read_csv(tables / "table1_per_class_my_brain.csv", dtype=str).set_index("class")
    assert list(per_class.index) == ["left caudate", "left hippocampus", "mean"]
    for name in ("left caudate", "left hippocampus"):
        assert float(per_class.loc[name, "Dice"]) == pytest.approx(rows.loc[name, "dice"], abs=5e-4)
        assert per_class.loc[name, "cases"] == str(int(rows.loc[name, "n"]))
    html = (trained["results"] / "report" / "index.html").read_text(encoding="utf-8")
    assert "left caudate" in html and "left hippocampus" in html


@pytest.mark.parametrize("phrase", ["Left Caudate", "caudate l"])
def test_segment_with_the_weights_alone_names_a_declared_class_by_name_or_synonym(
        trained: dict, phrase: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config.yaml: the weights alone say what the classes are
    scan = trained["data"] / "imagesTr" / "sub0.nii.gz"
    out = tmp_path / "out"
    code = main(["segment", "-i", str(scan), "-o", str(out), "--prompts", f"{phrase}, left hippocampus",
                 "--modality", "MRI", "--sequence", "T1", "--weights", str(trained["model"]),
                 "--prompt-cache", str(trained["cache"]), "--device", "cpu", "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [(p["phrase"], p["class"], p["text"], p["declared_class"]) for p in report["prompts"]] == [
        (phrase, "left caudate", CAUDATE_TEXT, True), ("left hippocampus", "left hippocampus", HIPPOCAMPUS_TEXT, True)]
    # The sentences training encoded, so the embeddings are the cached ones; the region is the classes'.
    assert report["region"] == "brain" and report["zero_shot"] == []
    # One mask per class, named by the class whichever way the prompt named it, on the scan's grid.
    assert [Path(output).name for output in report["outputs"]] == ["left_caudate.nii.gz", "left_hippocampus.nii.gz"]
    for output in report["outputs"]:
        mask = sitk.ReadImage(str(out / Path(output).name))
        assert mask.GetSize() == sitk.ReadImage(str(scan)).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}


def test_list_classes_with_the_weights_alone_marks_the_declared_classes(trained: dict, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["list-classes", "--weights", str(trained["model"])]) == 0
    out = capsys.readouterr().out
    assert "my_brain                 MRI      brain            left caudate, left hippocampus" in out
    declared = out[out.index("declared classes"):]
    assert "left caudate" in declared and "synonyms: caudate l" in declared and "prompt: left caudate nucleus" in declared
    assert "left hippocampus" in declared and "hippocampus" in declared


def test_a_config_that_declares_a_trained_class_otherwise_is_refused_with_both_declarations(
        trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config = run_config(trained["work"], trained["data"])
    config["datasets"]["my_brain"]["classes"]["Left Caudate"]["prompt"] = "caudate nucleus, left"
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    scan = trained["data"] / "imagesTr" / "sub0.nii.gz"
    code = main(["segment", "-i", str(scan), "-o", str(tmp_path / "out"), "--prompts", "caudate l", "--modality", "MRI",
                 "--weights", str(trained["model"]), "--prompt-cache", str(trained["cache"]), "--config",
                 str(tmp_path / "other.yaml"), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists()
    assert "class 'left caudate': the config (--config, default ./config.yaml) declares it in datasets.my_brain.classes " \
           "with region 'brain', no parent, prompt 'caudate nucleus, left'" in err
    assert f"{trained['model'].with_suffix('.json')} records that the weights were trained with region 'brain', no " \
           "parent, prompt 'left caudate nucleus'" in err
    # The same declaration as the weights' (synonyms may add up) is no conflict.
    config["datasets"]["my_brain"]["classes"]["Left Caudate"].update(prompt="left  caudate nucleus", synonyms=["l caud"])
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    code = main(["segment", "-i", str(scan), "-o", str(tmp_path / "out"), "--prompts", "l caud", "--modality", "MRI",
                 "--sequence", "T1", "--weights", str(trained["model"]), "--prompt-cache", str(trained["cache"]),
                 "--config", str(tmp_path / "same.yaml"), "--device", "cpu", "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert [(p["class"], p["text"]) for p in report["prompts"]] == [("left caudate", CAUDATE_TEXT)]

"""`duplus segment` on a tiny anisotropic, non-LPS scan: masks on exactly the input grid, clear errors.

Prompt resolution and the prompt cache are replaced by fakes; preprocessing and restoring are real.
"""

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk
from segment_helpers import make_setup

from duplus.errors import ConfigError, DataError
from duplus.segment import command, request
from duplus.segment.api import segment_image
from duplus.segment.checks import warn_if_ct_like
from duplus.segment.outputs import check_outputs, overlap_notes


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    return make_setup(tmp_path, monkeypatch)


def _same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_masks_are_written_on_the_input_grid(setup, tmp_path):
    out = tmp_path / "out"
    report = segment_image(str(setup["scan"]), str(out), "liver, liver tumor", "CT", weights=str(setup["weights"]),
                           sha256=setup["sha"], device="cpu", config=setup["config"])
    assert report["outputs"] == ["liver.nii.gz", "liver_tumor.nii.gz"]
    for name in report["outputs"]:
        mask = sitk.ReadImage(str(out / name))
        _same_grid(mask, setup["image"])
        assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["model"]["sha256"] == setup["sha"] and saved["region"] == "abdomen" and saved["window"] == [16, 16, 16]
    assert [p["class"] for p in saved["prompts"]] == ["liver", "liver tumor"]


def test_multilabel_output(setup, tmp_path):
    out = tmp_path / "multi"
    report = segment_image(str(setup["scan"]), str(out), ["liver", "spleen-ish blob"], "ct", region="abdomen",
                           weights=str(setup["weights"]), device="cpu", config=setup["config"], multilabel=True)
    assert report["outputs"] == ["labels.nii.gz", "labels.json"]
    _same_grid(sitk.ReadImage(str(out / "labels.nii.gz")), setup["image"])
    assert json.loads((out / "labels.json").read_text(encoding="utf-8")) == {"0": "background", "1": "liver",
                                                                             "2": "spleen-ish blob"}


def _run(argv, capsys):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    code = command.run(parser.parse_args(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "change,message",
    [
        ({"-i": "missing.nii.gz"}, "missing.nii.gz"),
        ({"--modality": "US"}, "unknown modality 'US'"),
        ({"--sha256": "ab" * 32}, "does not match the expected"),
        ({"--prompts": " , "}, "no class named"),
        ({"4d": True}, "3-D"),
        ({"--threshold": "50"}, "strictly between 0 and 1"),
        ({"-o": "scan.nii.gz/out"}, "scan.nii.gz"),  # an output folder inside a file: no traceback
    ],
)
def test_bad_inputs_exit_2_with_one_line(setup, tmp_path, capsys, change, message):
    args = {"-i": str(setup["scan"]), "-o": str(tmp_path / "o"), "--prompts": "liver", "--modality": "CT",
            "--weights": str(setup["weights"]), "--device": "cpu", "--config": str(tmp_path / "c.yaml")}
    (tmp_path / "c.yaml").write_text(json.dumps(setup["config"]))
    if change.pop("4d", False):
        volume = sitk.JoinSeries([setup["image"], setup["image"]])
        sitk.WriteImage(volume, str(tmp_path / "4d.nii.gz"))
        change = {"-i": str(tmp_path / "4d.nii.gz")}
    args.update({k: (str(tmp_path / v) if k in ("-i", "-o") and not v.startswith("/") else v) for k, v in change.items()})
    code, err = _run([x for kv in args.items() for x in kv], capsys)
    assert code == 2
    assert err.startswith("duplus: error:") and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_a_class_asked_for_twice_is_segmented_once():
    resolved = request.resolve_prompts("Liver, liver tumour, hepatic tumor", "CT", None, ["liver"])
    assert [item[1] for item in resolved] == ["liver", "liver tumor"]


def test_default_paths_follow_the_run_config():
    weights, cache = request.default_paths({"paths": {"results": "runs/paper"}, "prompts": {"encoder": "clipmd"}})
    assert weights == "runs/paper/pretrain/model.safetensors" and cache == "runs/paper/prompts/clipmd.safetensors"
    assert request.default_paths({}) == ("results/pretrain/model.safetensors", "results/prompts/minilm.safetensors")


def test_outside_a_run_the_missing_default_model_says_what_to_give(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(["-i", str(setup["scan"]), "-o", str(tmp_path / "out"), "--prompts", "liver", "--modality", "CT"],
                     capsys)
    assert code == 2 and "results/pretrain/model.safetensors: no trained model there" in err
    assert "give --weights" in err and err.count("\n") == 1


def test_an_output_over_the_input_is_refused_before_any_work(setup, tmp_path, capsys):
    scan = tmp_path / "liver.nii.gz"  # a scan named like the mask `--prompts liver` writes
    scan.write_bytes(setup["scan"].read_bytes())
    before = scan.read_bytes()
    args = ["-i", str(scan), "-o", str(tmp_path), "--prompts", "liver", "--modality", "CT",
            "--weights", str(setup["weights"]), "--device", "cpu", "--config", str(tmp_path / "c.yaml")]
    (tmp_path / "c.yaml").write_text(json.dumps(setup["config"]))
    code, err = _run(args, capsys)
    assert code == 2 and "would overwrite the input" in err and str(scan) in err
    assert scan.read_bytes() == before and not (tmp_path / "report.json").exists()
    dicom_folder = tmp_path / "series"
    dicom_folder.mkdir()
    with pytest.raises(ConfigError, match="inside the input DICOM folder"):
        check_outputs(dicom_folder, dicom_folder / "masks", ["liver.nii.gz"])


def test_one_volume_of_a_4d_scan_is_segmented_with_channel(setup, tmp_path):
    volume = sitk.JoinSeries([setup["image"], setup["image"] * 0.0])
    path = tmp_path / "4d.nii.gz"
    sitk.WriteImage(volume, str(path))
    out = tmp_path / "out4d"
    report = segment_image(str(path), str(out), "liver", "CT", weights=str(setup["weights"]), device="cpu",
                           config=setup["config"], channel=0)
    _same_grid(sitk.ReadImage(str(out / "liver.nii.gz")), setup["image"])
    assert report["channel"] == 0


def test_a_sheared_scan_is_refused_rather_than_masked_on_another_grid(setup, tmp_path):
    sheared = sitk.Image(setup["image"])
    sheared.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.26, 0.0, 0.0, 0.97))  # gantry-tilt-like shear
    path = tmp_path / "tilted.mha"
    sitk.WriteImage(sheared, str(path))
    with pytest.raises(DataError, match="sheared"):
        segment_image(str(path), str(tmp_path / "o"), "liver", "CT", weights=str(setup["weights"]),
                      device="cpu", config=setup["config"])
    assert not (tmp_path / "o").exists()


def test_overlapping_classes_in_one_label_image_are_reported():
    notes = overlap_notes(["kidney", "right kidney", "liver"], predicted=[7694, 2878, 500], kept=[4816, 2878, 500])
    assert notes == ["labels.nii.gz: 'kidney' keeps 4816 of its 7694 voxels; the rest is drawn as smaller classes that "
                     "overlap it (one label per voxel; without --multilabel every class gets its own mask)"]
    assert overlap_notes(["liver"], [10], [10]) == []


def test_a_ct_run_as_mri_or_pet_is_warned_about(setup, caplog):
    ct = sitk.GetImageFromArray(np.full((8, 8, 8), -1000.0, np.float32))  # air, as a CT stores it
    with caplog.at_level("WARNING"):
        assert warn_if_ct_like(ct, "PET", "scan.nii.gz")
    assert "is --modality PET right?" in caplog.text
    assert not warn_if_ct_like(ct, "CT", "scan.nii.gz")
    mri = sitk.GetImageFromArray(np.random.default_rng(0).uniform(-5, 800, (8, 8, 8)).astype(np.float32))
    assert not warn_if_ct_like(mri, "MRI", "scan.nii.gz")


def test_the_report_hashes_a_metaimage_header_with_its_data(setup, tmp_path):
    from duplus.hashing import sha256_file, sha256_files

    path = tmp_path / "scan.mhd"
    sitk.WriteImage(setup["image"], str(path))  # scan.mhd names scan.raw, which holds the voxels
    report = segment_image(str(path), str(tmp_path / "out"), "liver", "CT", weights=str(setup["weights"]),
                           device="cpu", config=setup["config"])
    assert report["input_sha256"] == sha256_files([path, tmp_path / "scan.raw"]) != sha256_file(path)
    assert report["input_files_hashed"] == 2 and report["outputs"] == ["liver.mha"]
    nifti = segment_image(str(setup["scan"]), str(tmp_path / "out2"), "liver", "CT", device="cpu",
                          weights=str(setup["weights"]), config=setup["config"])
    assert nifti["input_sha256"] == sha256_file(setup["scan"])  # one file: what sha256sum prints


def test_fast_runs_the_windows_with_less_overlap_and_records_it(setup, tmp_path, capsys):
    config = {**setup["config"], "inference": {**setup["config"]["inference"], "overlap": 0.5}}
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    common = ["-i", str(setup["scan"]), "--prompts", "liver", "--modality", "CT", "--weights", str(setup["weights"]),
              "--device", "cpu", "--config", str(tmp_path / "c.yaml")]
    overlaps = {}
    for name, extra in (("plain", []), ("fast", ["--fast"])):
        code, err = _run([*common, "-o", str(tmp_path / name), *extra], capsys)
        assert code == 0, err
        overlaps[name] = json.loads((tmp_path / name / "report.json").read_text(encoding="utf-8"))["settings"]["overlap"]
    assert overlaps == {"plain": 0.5, "fast": 0.25}

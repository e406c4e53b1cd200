"""`duplus segment` on many scans (a folder or a CSV list) and in memory (`duplus.segment_images`): the model
loads once, the next scan is read while one is predicted, finished scans are skipped on a rerun, one bad
scan does not stop the others."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import SimpleITK as sitk
from segment_helpers import make_setup

import duplus
from duplus.errors import ConfigError, DataError
from duplus.segment import api, command, network
from duplus.segment.batch import find_scans, is_batch_input
from duplus.segment.segmenter import Segmenter


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    found = make_setup(tmp_path, monkeypatch)
    loads = []
    real = network._load_network

    def counted(*args):
        loads.append(args[0])
        return real(*args)

    monkeypatch.setattr(network, "_load_network", counted)
    monkeypatch.setattr(network, "_NETWORKS", {})
    monkeypatch.setattr(api, "_LAST_SEGMENTER", {})
    found["loads"] = loads
    (tmp_path / "c.yaml").write_text(json.dumps(found["config"]))
    return found


def _scans(setup, root):
    """Three good scans in nested folders (NIfTI, MetaImage, NRRD) and one broken file."""
    (root / "site_a").mkdir(parents=True)
    (root / "site_b" / "deep").mkdir(parents=True)
    sitk.WriteImage(setup["image"], str(root / "site_a" / "case1.nii.gz"))
    sitk.WriteImage(setup["image"], str(root / "site_b" / "case2.mha"))
    sitk.WriteImage(setup["image"], str(root / "site_b" / "deep" / "case3.nrrd"))
    (root / "site_b" / "broken.nii.gz").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not a scan")


def _cli(setup, tmp_path, source, out, *extra):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = ["-i", str(source), "-o", str(out), "--prompts", "liver, liver tumor", "--modality", "CT",
            "--weights", str(setup["weights"]), "--device", "cpu", "--config", str(tmp_path / "c.yaml"), *extra]
    return command.run(parser.parse_args(argv))


def test_a_folder_of_scans_is_segmented_with_one_model_load_and_a_summary(setup, tmp_path, capsys):
    source, out = tmp_path / "scans", tmp_path / "masks"
    _scans(setup, source)
    assert _cli(setup, tmp_path, source, out) == 1  # one scan failed: the exit status says so
    assert len(setup["loads"]) == 1
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    status = {row["scan"]: row["status"] for row in summary["scans"]}
    assert status == {"site_a/case1": "done", "site_b/broken": "failed", "site_b/case2": "done",
                      "site_b/deep/case3": "done"}
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 1}
    for name, suffix in (("site_a/case1", "nii.gz"), ("site_b/case2", "mha"), ("site_b/deep/case3", "nrrd")):
        mask = sitk.ReadImage(str(out / name / f"liver.{suffix}"))
        assert mask.GetSize() == setup["image"].GetSize()
        assert np.allclose(mask.GetOrigin(), setup["image"].GetOrigin(), atol=1e-5)
        assert json.loads((out / name / "report.json").read_text(encoding="utf-8"))["outputs"][1] == f"liver_tumor.{suffix}"
    broken = next(row for row in summary["scans"] if row["status"] == "failed")
    assert "broken.nii.gz" in broken["error"] and not (out / "site_b" / "broken" / "report.json").exists()
    done = [row for row in summary["scans"] if row["status"] == "done"]
    assert all(row["seconds"] > 0 and row["peak_memory_mb"] > 10 for row in done)
    assert all(row["classes"] == ["liver", "liver tumor"] for row in summary["scans"])
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == [row["status"] for row in summary["scans"]]
    assert rows[0]["classes"] == "liver; liver tumor"
    printed = capsys.readouterr()
    assert "4 scan(s): 3 segmented, 0 already done, 1 failed" in printed.out
    assert "duplus: failed: site_b/broken:" in printed.err


def test_a_rerun_skips_finished_scans_and_redoes_changed_ones(setup, tmp_path, monkeypatch):
    source, out = tmp_path / "scans", tmp_path / "masks"
    _scans(setup, source)
    (source / "site_b" / "broken.nii.gz").unlink()
    assert _cli(setup, tmp_path, source, out) == 0
    stamp = (out / "site_a" / "case1" / "liver.nii.gz").stat().st_mtime_ns

    def no_model(*args):
        raise AssertionError("nothing left to do: the model must not load")

    monkeypatch.setattr(network, "_load_network", no_model)
    monkeypatch.setattr(network, "_NETWORKS", {})
    assert _cli(setup, tmp_path, source, out) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["counts"] == {"done": 0, "skipped": 3, "failed": 0}
    assert (out / "site_a" / "case1" / "liver.nii.gz").stat().st_mtime_ns == stamp

    monkeypatch.setattr(network, "_load_network", lambda *a: setup["loads"].append(a[0]) or _real_load(*a))
    changed = sitk.Image(setup["image"]) * 2.0  # new voxels under the same name
    sitk.WriteImage(changed, str(source / "site_b" / "case2.mha"))
    (out / "site_b" / "deep" / "case3" / "liver.nrrd").unlink()  # an interrupted scan: its masks incomplete
    assert _cli(setup, tmp_path, source, out) == 0
    status = {row["scan"]: row["status"] for row in json.loads((out / "summary.json").read_text())["scans"]}
    assert status == {"site_a/case1": "skipped", "site_b/case2": "done", "site_b/deep/case3": "done"}
    assert _cli(setup, tmp_path, source, out, "--threshold", "0.7") == 0  # other settings: every scan again
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert counts == {"done": 3, "skipped": 0, "failed": 0}


def _real_load(*args):
    from duplus.model import load_model

    model, sidecar = load_model(args[0], expected_sha256=args[1], device=args[3])
    return model, sidecar


def test_a_csv_list_names_scans_and_their_output_folders(setup, tmp_path):
    source = tmp_path / "scans"
    _scans(setup, source)
    table = tmp_path / "list.csv"
    table.write_text("image,id\nscans/site_a/case1.nii.gz,patient_7\n" + f"{source / 'site_b' / 'case2.mha'},\n",
                     encoding="utf-8")
    assert _cli(setup, tmp_path, table, tmp_path / "out") == 0
    assert (tmp_path / "out" / "patient_7" / "liver.nii.gz").is_file()
    assert (tmp_path / "out" / "case2" / "liver.mha").is_file()
    table.write_text("path\nscans/site_a/case1.nii.gz\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="needs a column 'image'"):
        find_scans(table, tmp_path / "out")
    table.write_text("image,id\na.nii.gz,x\nb.nii.gz,X\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"ids used twice: x \(lines 2, 3\)"):
        find_scans(table, tmp_path / "out")


def test_an_output_folder_inside_the_input_folder_is_not_searched(setup, tmp_path):
    source = tmp_path / "scans"
    _scans(setup, source)
    (source / "site_b" / "broken.nii.gz").unlink()
    sitk.WriteImage(setup["image"], str(source / "site_b" / "case2.nii.gz"))  # beside case2.mha: names kept apart
    found = find_scans(source, source / "masks")
    assert [scan.name for scan in found] == ["site_a/case1", "site_b/case2_mha", "site_b/case2_nii_gz",
                                             "site_b/deep/case3"]
    (source / "masks" / "x").mkdir(parents=True)
    sitk.WriteImage(setup["image"], str(source / "masks" / "x" / "liver.nii.gz"))
    assert len(find_scans(source, source / "masks")) == 4
    with pytest.raises(ConfigError, match="is the input folder itself"):
        find_scans(source, source)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no scans found"):
        find_scans(tmp_path / "empty", tmp_path / "o")
    dicom = tmp_path / "series"
    dicom.mkdir()
    (dicom / "1.dcm").write_bytes(b"\0" * 128 + b"DICM")
    assert not is_batch_input(dicom) and is_batch_input(source)  # one series: one scan


def test_the_next_scan_is_read_while_one_is_predicted(setup, tmp_path, monkeypatch):
    source = tmp_path / "scans"
    _scans(setup, source)
    (source / "site_b" / "broken.nii.gz").unlink()
    second_read = threading.Event()
    reads = []
    real_prepare, real_predict = Segmenter.prepare, Segmenter.predict

    def prepare(self, image, channel=None):
        reads.append((str(image), threading.current_thread().name))
        if len(reads) == 2:
            second_read.set()
        return real_prepare(self, image, channel)

    overlapped = []

    def predict(self, prepared):
        if len(overlapped) == 0:  # the first scan's prediction waits (bounded) for the second scan's reading
            overlapped.append(second_read.wait(timeout=60))
        return real_predict(self, prepared)

    monkeypatch.setattr(Segmenter, "prepare", prepare)
    monkeypatch.setattr(Segmenter, "predict", predict)
    assert _cli(setup, tmp_path, source, tmp_path / "out") == 0
    assert overlapped == [True]
    assert all(name.startswith("duplus-read") for _, name in reads) and len(reads) == 3


def test_images_in_memory_give_masks_and_reuse_the_model(setup):
    options = dict(weights=str(setup["weights"]), device="cpu", config=setup["config"])
    masks = duplus.segment_images(setup["image"], "liver, liver tumor", "CT", **options)
    assert list(masks) == ["liver", "liver tumor"]
    assert masks["liver"].GetSize() == setup["image"].GetSize()
    assert np.allclose(masks["liver"].GetDirection(), setup["image"].GetDirection())
    array = sitk.GetArrayFromImage(setup["image"])
    both = duplus.segment_images([array, array], "liver, liver tumor", "CT", spacing=(1.5, 1.2, 3.0), **options)
    assert len(both) == 2 and both[0]["liver"].shape == array.shape and both[0]["liver"].dtype == np.uint8
    assert len(setup["loads"]) == 1  # the second call used the loaded network
    with pytest.raises(DataError, match="expected a 3-D array"):
        duplus.segment_images(array[0], "liver", "CT", **options)


def test_ecosystem_aliases_of_the_options():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["-i", "a", "-o", "b", "--modality", "CT", "--ml", "-q", "--device", "gpu:0"])
    assert args.multilabel and args.quiet and args.device == "gpu:0"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["-i", "missing.nii.gz", "--prompts", "liver"], "missing.nii.gz: file not found"),
        (["--prompts", " , ,"], "--prompts ' , ,': no class named in it"),
        ([], "--prompts is missing"),
        (["--prompts", "liver", "--device", "tpu"], "device 'tpu': expected one of"),
        (["--prompts", "liver", "-o", "scan.nii.gz/out"], "is a file, not a folder"),
        (["--prompts", "liver", "--output-type", "dicom_seg"], "is not a DICOM series folder"),
        (["--prompts", "liver", "--output-type", "dicom_rtstruct", "--ml"], "--multilabel is for mask images"),
    ],
)
def test_argument_mistakes_are_answered_before_torch_is_imported(setup, tmp_path, argv, message):
    args = {"-i": str(setup["scan"]), "-o": str(tmp_path / "o"), "--modality": "CT"}
    argv = [x for kv in args.items() for x in kv if kv[0] not in argv] + [
        str(tmp_path / v) if v.endswith((".gz", "/out")) else v for v in argv]
    code = ("import sys; from duplus.cli import main; code = main(['segment', *sys.argv[1:]]); "
            "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'imported'; sys.exit(code)")
    child = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert child.returncode == 2, child.stderr
    assert child.stderr.startswith("duplus: error:") and message in child.stderr and child.stderr.count("\n") == 1

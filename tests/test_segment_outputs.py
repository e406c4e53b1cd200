"""The output folder of `duplus segment`: masks in the input's format (exact geometry), checks before the
model loads, files of an earlier run, and Ctrl-C."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
from segment_helpers import make_setup

from duplus.cli import main
from duplus.errors import ConfigError
from duplus.segment import network
from duplus.segment.api import segment_image
from duplus.segment.outputs import MAX_STEM, output_format

# Digits NIfTI-1's float32 geometry cannot hold: a NIfTI mask of this scan sits ~1e-6 mm off it.
ORIGIN = (-123.456789, 7.123456789, 3.3333333)


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    return make_setup(tmp_path, monkeypatch)


def _segment(setup, image, out, prompts="liver", **kwargs):
    return segment_image(str(image), str(out), prompts, "CT", weights=str(setup["weights"]), device="cpu",
                         config=setup["config"], **kwargs)


def _cli(setup, tmp_path, *extra):
    (tmp_path / "c.yaml").write_text(json.dumps(setup["config"]))
    try:
        return _main(setup, tmp_path, *extra)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped `duplus segment` as a traceback")


def _main(setup, tmp_path, *extra):
    return main(["segment", "-i", str(setup["scan"]), "--prompts", "liver", "--modality", "CT", "--weights",
                 str(setup["weights"]), "--device", "cpu", "--config", str(tmp_path / "c.yaml"), *extra])


def test_masks_of_an_nrrd_scan_are_nrrd_on_exactly_its_grid(setup, tmp_path):
    scan = sitk.Image(setup["image"])
    scan.SetOrigin(ORIGIN)
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(scan, str(path))
    scan = sitk.ReadImage(str(path))
    report = _segment(setup, path, tmp_path / "out", "liver, liver tumor")
    assert report["outputs"] == ["liver.nrrd", "liver_tumor.nrrd"] and report["format"] == "nrrd"
    for name in report["outputs"]:
        mask = sitk.ReadImage(str(tmp_path / "out" / name))
        assert mask.GetOrigin() == scan.GetOrigin() == ORIGIN
        assert mask.GetSpacing() == scan.GetSpacing() and mask.GetDirection() == scan.GetDirection()
        masked = sitk.Mask(scan, sitk.Cast(mask, sitk.sitkUInt8))  # ITK refuses masks off the scan's grid
        assert masked.GetSize() == scan.GetSize()


def test_format_follows_the_input_unless_given(setup, tmp_path):
    assert output_format("a/scan.nii") == output_format("scan.NII.GZ") == "nii.gz"
    assert output_format("scan.nhdr") == "nrrd" and output_format("scan.mhd") == output_format("scan.mha") == "mha"
    dicom = tmp_path / "series"
    dicom.mkdir()
    assert output_format(dicom) == "nrrd"  # DICOM geometry is double precision: NIfTI would shift it
    with pytest.raises(ConfigError, match=r"--format tiff: expected one of nii\.gz, nrrd, mha"):
        output_format("scan.nii.gz", "tiff")
    report = _segment(setup, setup["scan"], tmp_path / "mha", multilabel=True, mask_format="mha")
    assert report["outputs"] == ["labels.mha", "labels.json"]
    assert sitk.ReadImage(str(tmp_path / "mha" / "labels.mha")).GetSize() == setup["image"].GetSize()


def test_an_output_that_is_a_file_is_refused_before_the_model_loads(setup, tmp_path, capsys, monkeypatch):
    def no_model(*args):
        raise AssertionError("the model must not load for a bad --output")

    monkeypatch.setattr(network, "_load_network", no_model)
    taken = tmp_path / "masks"
    taken.write_text("not a folder")
    assert _cli(setup, tmp_path, "-o", str(taken)) == 2
    err = capsys.readouterr().err
    assert err == f"duplus: error: --output {taken} is a file, not a folder; give a folder for the masks\n"
    assert taken.read_text() == "not a folder"


def test_long_class_names_give_short_distinct_file_names(setup, tmp_path):
    words = " ".join(f"word{k}" for k in range(40))  # 41 words: a file name of ~270 characters
    report = _segment(setup, setup["scan"], tmp_path / "out", f"{words} one, {words} two", region="abdomen")
    first, second = report["outputs"]
    assert first != second and all(len(name) <= MAX_STEM + len(".nii.gz") for name in report["outputs"])
    assert first.startswith("word0_word1_") and first.endswith(".nii.gz")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([first, second, "report.json"])


def test_a_reused_folder_keeps_only_this_runs_files(setup, tmp_path):
    out = tmp_path / "out"
    _segment(setup, setup["scan"], out, "liver, liver tumor")
    (out / "notes.txt").write_text("mine")  # not listed by any report: never touched
    outside = tmp_path / "outside.nii.gz"
    outside.write_text("keep")
    _segment(setup, setup["scan"], out, "liver")
    assert sorted(p.name for p in out.iterdir()) == ["liver.nii.gz", "notes.txt", "report.json"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    report["outputs"] += ["../outside.nii.gz", str(outside), "notes.txt/.."]  # a report edited to point elsewhere
    (out / "report.json").write_text(json.dumps(report))
    _segment(setup, setup["scan"], out, "liver", multilabel=True)
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "labels.nii.gz", "notes.txt", "report.json"]
    assert outside.read_text() == "keep"
    (out / "report.json").write_text(json.dumps({"outputs": ["notes.txt"]}))  # another tool's report
    _segment(setup, setup["scan"], out, "liver")
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "labels.nii.gz", "liver.nii.gz", "notes.txt",
                                                     "report.json"]


def test_a_run_that_fails_while_writing_leaves_no_report(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _segment(setup, setup["scan"], out, "liver")
    import duplus.data.image_io as io

    def full_disk(image, path, compress=True):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(io, "write_image", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _segment(setup, setup["scan"], out, "liver")
    assert not (out / "report.json").exists()  # no report: no completed run in this folder


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_temporary_files(setup, tmp_path, capsys, monkeypatch):
    import duplus.inference.predict as inference

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(inference, "predict_masks", interrupted)
        assert _cli(setup, tmp_path, "-o", str(tmp_path / "a")) == 130
    assert capsys.readouterr().err == "duplus: interrupted\n"

    write = sitk.WriteImage

    def interrupted_mid_write(image, name, *args, **kwargs):
        write(image, name, *args, **kwargs)  # the temporary file exists when Ctrl-C comes
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", interrupted_mid_write)
    assert _cli(setup, tmp_path, "-o", str(tmp_path / "b")) == 130
    assert capsys.readouterr().err.endswith("duplus: interrupted\n")
    assert list((tmp_path / "b").iterdir()) == []  # neither the mask nor its temporary file

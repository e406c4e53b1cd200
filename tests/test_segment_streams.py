"""What `duplus segment` prints is its own: library output (nibabel's header notes, ITK's GDCM warning, torch's
weights_only warning) is held back, or said once in our words where it matters; stdout holds only the answer."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import warnings

import nibabel
import numpy as np
import SimpleITK as sitk
from segment_helpers import FakeCache, make_setup, write_prompt_cache

from duplus.data.image_io import read_image
from duplus.segment import network
from duplus.segment.api import segment_image

# A line of ours on stderr: a log line ("INFO ...", "WARNING ..."; ITK's own begin "WARNING: In"), or "duplus: ...".
OURS = re.compile(r"^(INFO|WARNING|ERROR) |^duplus: ")


def _with_pixdim(source, target, index, value):
    """``source`` saved again with pixdim[index] set to ``value`` (the voxels and the affine unchanged)."""
    image = nibabel.load(str(source))
    copy = nibabel.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header.copy())
    copy.header["pixdim"][index] = value
    nibabel.save(copy, str(target))
    with nibabel.openers.ImageOpener(str(target)) as handle:  # as written, unchecked: the test's premise
        assert nibabel.Nifti1Header.from_fileobj(handle, check=False)["pixdim"][index] == value
    return target


def test_a_run_over_a_mended_header_and_a_folder_without_dicom_prints_only_its_own_lines(tmp_path, monkeypatch):
    setup = make_setup(tmp_path, monkeypatch)  # monkeypatched fakes do not reach the process below: a real cache
    cache = write_prompt_cache(tmp_path / "prompts.safetensors", "liver")
    (tmp_path / "c.yaml").write_text(json.dumps(setup["config"]))
    # qfac 0: nibabel logs "pixdim[0] (qfac) should be 1 (default) or -1; setting qfac to 1" twice; ITK reads
    # it as 1 as well, so nothing is worth saying. A folder without DICOM files: GDCM warns "No Series were found".
    _with_pixdim(setup["scan"], tmp_path / "qfac0.nii.gz", 0, 0.0)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a scan")
    (tmp_path / "list.csv").write_text("image\nqfac0.nii.gz\nnotes\n", encoding="utf-8")
    child = subprocess.run(
        [sys.executable, "-m", "duplus.cli", "segment", "-i", str(tmp_path / "list.csv"), "-o", str(tmp_path / "out"),
         "--prompts", "liver", "--modality", "CT", "--weights", str(setup["weights"]), "--prompt-cache", str(cache),
         "--device", "cpu", "--config", str(tmp_path / "c.yaml")],
        capture_output=True, text=True, timeout=600)
    assert child.returncode == 1, child.stderr  # the folder failed, the scan did not
    summary = tmp_path / "out" / "summary.json"
    assert child.stdout == f"2 scan(s): 1 segmented, 0 already done, 1 failed (summary: {summary})\n"
    rows = json.loads(summary.read_text(encoding="utf-8"))["scans"]
    assert [row["status"] for row in rows] == ["done", "failed"] and "holds no DICOM series" in rows[1]["error"]
    assert "pixdim" not in child.stderr and "GDCM" not in child.stderr and "Traceback" not in child.stderr
    assert [line for line in child.stderr.splitlines() if line.strip() and not OURS.match(line)] == []


def test_a_header_nibabel_corrects_is_one_line_of_ours_and_none_of_nibabel(tmp_path, caplog):
    scan = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    sitk.WriteImage(scan, str(tmp_path / "scan.nii.gz"))
    path = _with_pixdim(tmp_path / "scan.nii.gz", tmp_path / "negative.nii.gz", 2, -1.0)
    heard = []
    listener = logging.Handler()
    listener.emit = heard.append  # what nibabel's own stderr handler would print
    nibabel_logger = logging.getLogger("nibabel.global")
    nibabel_logger.addHandler(listener)
    try:
        with caplog.at_level(logging.DEBUG):
            read_image(path)
            read_image(_with_pixdim(tmp_path / "scan.nii.gz", tmp_path / "qfac0.nii.gz", 0, 0.0))
    finally:
        nibabel_logger.removeHandler(listener)
    assert heard == []
    ours = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [record.name for record in ours] == ["duplus.data.image_io"]
    assert ours[0].getMessage() == (f"{path}: the NIfTI header needed correcting (pixdim[1,2,3] should be positive; "
                                    "setting to abs of pixdim values); check the scan's spacing and orientation")
    assert any("qfac" in record.getMessage() for record in caplog.records if record.levelno == logging.DEBUG)


def test_torch_weights_only_warning_is_not_passed_on(tmp_path, monkeypatch, recwarn):
    setup = make_setup(tmp_path, monkeypatch)

    def embeddings(path, texts, config, device):
        # What torch 2.4 and 2.5 say when a text encoder's .bin weights are loaded without naming weights_only.
        warnings.warn("You are using `torch.load` with `weights_only=False` (the current default value), which uses "
                      "the default pickle module implicitly.", FutureWarning, stacklevel=2)
        return FakeCache()

    monkeypatch.setattr(network, "prompt_embeddings", embeddings)
    monkeypatch.setattr(network, "_NETWORKS", {})
    report = segment_image(str(setup["scan"]), str(tmp_path / "out"), "liver", "CT", weights=str(setup["weights"]),
                           device="cpu", config=setup["config"])
    assert report["outputs"] == ["liver.nii.gz"]
    assert [str(w.message) for w in recwarn if "weights_only" in str(w.message)] == []

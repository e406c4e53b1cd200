"""DICOM outputs of `duplus segment` for a DICOM series: SEG and RTSTRUCT files read back, re-rasterised and
compared with the masks, their references checked against the source series, and validated by dciodvfy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from segment_helpers import make_setup, write_prompt_cache

from duplus.cli import main
from duplus.data.image_io import read_image_files
from duplus.segment.dicom import class_code, write_dicom

SLICES, ROWS, COLUMNS = 12, 20, 24
PIXEL_SPACING = (0.9, 1.3)  # row spacing (y), column spacing (x): not square, so rows and columns cannot swap
THICKNESS = 2.5
ORIGIN = (-20.0, -15.0, 40.0)


def write_ct_series(folder):
    """A small CT series; files named against slice order, so the writers must place slices by position."""
    folder.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    z, y, x = np.mgrid[:SLICES, :ROWS, :COLUMNS]
    body = ((x - 12) / 8.0) ** 2 + ((y - 10) / 6.0) ** 2 + ((z - 6) / 4.0) ** 2 < 1
    volume = np.where(body, 60, -1000).astype(np.int16)
    for index in range(SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "CT", "Test^Phantom", "P1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 3, index + 1, "Test"
        ds.PositionReferenceIndicator, ds.ImageType = "", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + index * THICKNESS]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = list(PIXEL_SPACING), THICKNESS
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.KVP, ds.AcquisitionNumber = 0, 1, 120, 1
        ds.PixelData = volume[index].tobytes()
        ds.save_as(str(folder / f"im{(7 * index) % SLICES:03d}.dcm"), enforce_file_format=True)
    return folder


def test_class_codes_are_snomed_where_pydicom_knows_the_concept():
    assert (class_code("liver").type.value, class_code("liver").type.scheme_designator) == ("10200004", "SCT")
    assert class_code("spleen").type.value == "78961009" and class_code("Left Kidney").type.value == "64033007"
    tumor = class_code("liver tumor")
    assert not tumor.exact and tumor.type.meaning == "Tissue" and tumor.category.meaning == "Tissue"


def _known_masks(scan):
    z, y, x = np.mgrid[:SLICES, :ROWS, :COLUMNS]
    liver = (abs(x - 9) < 5) & (abs(y - 9) < 4) & (z >= 3) & (z <= 8)
    tumor = ((x - 15) ** 2 + (y - 12) ** 2 < 9) & (z >= 5) & (z <= 6)
    images = []
    for array in (liver, tumor):
        image = sitk.GetImageFromArray(array.astype(np.uint8))
        image.CopyInformation(scan)
        images.append(image)
    return {"liver": images[0], "liver tumor": images[1]}


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def _seg_masks(path, scan, sources):
    """Class label -> mask re-read from a SEG with highdicom, placed by each frame's source instance."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    index_of = {}
    for file in sources:
        ds = pydicom.dcmread(str(file), stop_before_pixels=True)
        index_of[ds.SOPInstanceUID] = round(scan.TransformPhysicalPointToContinuousIndex(
            [float(v) for v in ds.ImagePositionPatient])[2])
    uids = sorted(index_of, key=index_of.get)
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=None)  # [slice, row, column, segment]
    masks = {}
    for number, description in enumerate(seg.SegmentSequence, start=1):
        volume = np.zeros((SLICES, ROWS, COLUMNS), bool)
        volume[[index_of[uid] for uid in uids]] = pixels[..., number - 1] > 0
        masks[description.SegmentLabel] = volume
    return seg, masks


def _rtstruct_masks(path, scan):
    """ROI name -> mask re-rasterised from the RTSTRUCT's contours (points in mm mapped onto the scan's grid)."""
    ds = pydicom.dcmread(str(path))
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    masks = {}
    for roi in ds.ROIContourSequence:
        volume = np.zeros((SLICES, ROWS, COLUMNS), bool)
        for contour in roi.ContourSequence:
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            index = np.array([scan.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
            plane = Image.new("1", (COLUMNS, ROWS))
            # Contour points run through pixel centres; rounded, as PIL would floor 4.9999998 to 4.
            corners = [(int(c), int(r)) for c, r in np.round(index[:, :2])]
            draw = ImageDraw.Draw(plane)
            draw.polygon(corners, fill=1, outline=1) if len(corners) > 1 else draw.point(corners, fill=1)
            volume[round(index[0, 2])] |= np.asarray(plane, bool)
        masks[names[roi.ReferencedROINumber]] = volume
    return ds, masks


def _source_uids(sources):
    first = pydicom.dcmread(str(sources[0]), stop_before_pixels=True)
    instances = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in sources}
    return first, instances


def _dciodvfy_errors(path):
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; tools/install_test_tools.sh installs it")
    found = subprocess.run([tool, str(path)], check=False, capture_output=True, text=True, timeout=120)
    return [line for line in (found.stdout + found.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture()
def series(tmp_path):
    folder = write_ct_series(tmp_path / "series")
    scan, sources = read_image_files(folder)
    return folder, scan, sources


def test_seg_holds_each_class_on_its_source_slices(series, tmp_path):
    folder, scan, sources = series
    known = _known_masks(scan)
    names = list(known)
    assert write_dicom(tmp_path / "out", "dicom_seg", lambda k: known[names[k]], names, sources, str(folder)) == \
        ["segmentation.dcm"]
    seg, masks = _seg_masks(tmp_path / "out" / "segmentation.dcm", scan, sources)
    assert list(masks) == names
    for name in names:
        assert _dice(masks[name], sitk.GetArrayFromImage(known[name]) > 0) >= 0.98, name
    first, instances = _source_uids(sources)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID and seg.StudyInstanceUID == first.StudyInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == instances
    liver, tumor = seg.SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert tumor.SegmentLabel == "liver tumor" and tumor.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"
    assert _dciodvfy_errors(tmp_path / "out" / "segmentation.dcm") == []


def test_rtstruct_contours_cover_each_class_on_the_source_series(series, tmp_path):
    folder, scan, sources = series
    known = _known_masks(scan)
    names = list(known)
    assert write_dicom(tmp_path / "out", "dicom_rtstruct", lambda k: known[names[k]], names, sources,
                       str(folder)) == ["rtstruct.dcm"]
    ds, masks = _rtstruct_masks(tmp_path / "out" / "rtstruct.dcm", scan)
    assert list(masks) == names
    for name in names:
        assert _dice(masks[name], sitk.GetArrayFromImage(known[name]) > 0) >= 0.9, name
    first, instances = _source_uids(sources)
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID and ds.StudyInstanceUID == first.StudyInstanceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    referenced = study.RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ContourImageSequence} == instances
    assert all(roi.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID for roi in ds.StructureSetROISequence)
    codes = [item.RTROIIdentificationCodeSequence[0] for item in ds.RTROIObservationsSequence]
    assert [(code.CodeValue, code.CodingSchemeDesignator) for code in codes] == [("10200004", "SCT"), ("85756007", "SCT")]
    assert _dciodvfy_errors(tmp_path / "out" / "rtstruct.dcm") == []


@pytest.mark.parametrize("output_type,file", [("dicom_seg", "segmentation.dcm"), ("dicom_rtstruct", "rtstruct.dcm")])
def test_segment_writes_a_dicom_output_matching_its_masks(series, tmp_path, monkeypatch, output_type, file):
    folder, scan, sources = series
    setup = make_setup(tmp_path, monkeypatch)
    config = dict(setup["config"], preprocess={"spacing": [1.5, 1.5, 2.5]})
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    argv = ["segment", "-i", str(folder), "--prompts", "liver", "--modality", "CT", "--weights", str(setup["weights"]),
            "--device", "cpu", "--config", str(tmp_path / "c.yaml"), "--threshold", "0.3"]
    assert main([*argv, "-o", str(tmp_path / "masks")]) == 0
    assert main([*argv, "-o", str(tmp_path / "dicom"), "--output-type", output_type]) == 0
    report = json.loads((tmp_path / "dicom" / "report.json").read_text())
    assert report["outputs"] == [file] and report["format"] == output_type
    assert sorted(p.name for p in (tmp_path / "dicom").iterdir()) == sorted([file, "report.json"])
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "masks" / "liver.nrrd"))) > 0
    assert ours.any(), "the tiny model found nothing to compare"
    if output_type == "dicom_seg":
        masks = _seg_masks(tmp_path / "dicom" / file, scan, sources)[1]
    else:
        masks = _rtstruct_masks(tmp_path / "dicom" / file, scan)[1]
    assert _dice(masks["liver"], ours) >= (0.98 if output_type == "dicom_seg" else 0.9)


@pytest.mark.parametrize("output_type,file", [("dicom_seg", "segmentation.dcm"), ("dicom_rtstruct", "rtstruct.dcm")])
def test_a_folder_of_series_gets_a_dicom_output_per_series_and_a_summary(tmp_path, monkeypatch, capfd, caplog, recwarn,
                                                                         output_type, file):
    (tmp_path / "study").mkdir()
    folders = [write_ct_series(tmp_path / "study" / name) for name in ("series_b", "series_a")]
    setup = make_setup(tmp_path, monkeypatch)
    (tmp_path / "c.yaml").write_text(json.dumps(dict(setup["config"], preprocess={"spacing": [1.5, 1.5, 2.5]})))
    capfd.readouterr()
    assert main(["segment", "-i", str(tmp_path / "study"), "-o", str(tmp_path / "out"), "--output-type", output_type,
                 "--prompts", "liver", "--modality", "CT", "--weights", str(setup["weights"]), "--device", "cpu",
                 "--config", str(tmp_path / "c.yaml"), "--threshold", "0.3"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert [(row["scan"], row["status"]) for row in summary["scans"]] == [("series_a", "done"), ("series_b", "done")]
    for folder in folders:
        scan, sources = read_image_files(folder)
        first, instances = _source_uids(sources)
        path = tmp_path / "out" / folder.name / file
        assert json.loads((path.parent / "report.json").read_text())["outputs"] == [file]
        if output_type == "dicom_seg":
            ds, masks = _seg_masks(path, scan, sources)
            referenced = ds.ReferencedSeriesSequence[0]
            assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == instances
        else:
            ds, masks = _rtstruct_masks(path, scan)
            referenced = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == first.SeriesInstanceUID  # each output references its own series
        assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID and masks["liver"].any()
    # Nothing of the DICOM libraries reaches the user: rt-utils' "Writing file to ..." on stdout, pydicom's
    # deprecation notes about rt-utils' dataset (logged and warned).
    summary_path = tmp_path / "out" / "summary.json"
    assert capfd.readouterr().out == f"2 scan(s): 2 segmented, 0 already done, 0 failed (summary: {summary_path})\n"
    assert not [record.getMessage() for record in caplog.records if record.name.startswith("pydicom")]
    assert not [str(w.message) for w in recwarn if "pydicom" in w.filename or "rt_utils" in w.filename]


@pytest.mark.parametrize("output_type", ["dicom_seg", "dicom_rtstruct"])
def test_a_dicom_output_run_prints_only_its_answer(series, tmp_path, monkeypatch, output_type):
    """As a user runs it, in its own process: highdicom's "copy attributes of module ..." (INFO), pydicom's
    deprecation notes on rt-utils' dataset and rt-utils' "Writing file to ..." on stdout are not shown."""
    folder, _, _ = series
    setup = make_setup(tmp_path, monkeypatch)
    cache = write_prompt_cache(tmp_path / "prompts.safetensors", "liver")
    (tmp_path / "c.yaml").write_text(json.dumps(dict(setup["config"], preprocess={"spacing": [1.5, 1.5, 2.5]})))
    out = tmp_path / "out"
    child = subprocess.run(
        [sys.executable, "-m", "duplus.cli", "segment", "-i", str(folder), "-o", str(out), "--output-type", output_type,
         "--prompts", "liver", "--modality", "CT", "--weights", str(setup["weights"]), "--prompt-cache", str(cache),
         "--device", "cpu", "--config", str(tmp_path / "c.yaml"), "--threshold", "0.3"],
        capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr
    assert child.stdout == f"wrote 1 file(s) to {out} (report: {out / 'report.json'})\n"
    assert child.stderr == ""

"""DICOM outputs of `duplus segment` for a DICOM series: a Segmentation (SEG) or an RT Structure Set (RTSTRUCT).

Both reference the series they were made from (its study, series and SOP instance UIDs and its frame of
reference), so a viewer or treatment-planning system opens them on the original images. Each class is
recorded by name and by a standard code (:func:`class_code`): SNOMED CT where pydicom's code dictionary
has the concept, else the generic 'Tissue' code with the class name as the label.

SEG is written with highdicom (binary, one segment per class); RTSTRUCT with rt-utils, which turns each
slice of a mask into contours (highdicom has no RT Structure Set module).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from duplus import __version__
from duplus.errors import DataError
from duplus.runtime import held_log_records
from duplus.segment.outputs import DICOM_OUTPUTS

LATERAL = ("left", "right")
MANUFACTURER = "DuPLUS"


class ClassCode(NamedTuple):
    """How a class is coded: its property category and type (pydicom ``Code``s) and whether the type is its own."""

    category: Any
    type: Any
    exact: bool


def class_code(name: str) -> ClassCode:
    """The standard code of a class name: the one place that maps class names to codes.

    ``codes.SCT`` (pydicom's SNOMED CT dictionary, from DICOM part 16) is looked up by the name in
    CamelCase ("urinary bladder" -> ``UrinaryBladder``). A sided class ("left kidney") takes its organ's
    code, the side staying in the label, as DICOM records sides as modifiers, not separate concepts.
    Names without a concept there (tumors, sub-regions) are coded as 'Tissue', the name as the label.
    """
    from pydicom.sr.codedict import codes

    words = name.replace("_", " ").replace("-", " ").lower().split()
    if words and words[0] in LATERAL and len(words) > 1:
        words = words[1:]
    keyword = "".join(word.capitalize() for word in words)
    if keyword in codes.SCT.dir():
        return ClassCode(codes.SCT.AnatomicalStructure, getattr(codes.SCT, keyword), True)
    return ClassCode(codes.SCT.Tissue, codes.SCT.Tissue, False)


def read_series(files: Sequence[Path], image: Any, where: str) -> list[tuple[Any, int]]:
    """(dataset, slice index of ``image``) of each DICOM file the scan was read from, in slice order.

    The index comes from the file's ImagePositionPatient on ``image``'s grid, so the masks (restored to
    that grid) are matched to their source slices whatever order the files are named in.
    """
    import pydicom

    if not files:
        raise DataError(f"{where}: DICOM outputs need a DICOM series as input (a folder of its files)")
    series = []
    for file in files:
        dataset = pydicom.dcmread(str(file))
        if "ImagePositionPatient" not in dataset:
            raise DataError(f"{file}: no ImagePositionPatient; cannot place this slice for the DICOM output")
        index = image.TransformPhysicalPointToContinuousIndex([float(v) for v in dataset.ImagePositionPatient])
        slice_index = round(index[2])
        if abs(index[2] - slice_index) > 0.1 or not 0 <= slice_index < image.GetSize()[2]:
            raise DataError(f"{file}: its ImagePositionPatient lies off the scan's slices (index {index[2]:.2f})")
        series.append((dataset, slice_index))
    return sorted(series, key=lambda item: item[1])


def write_dicom(out: Path, output_type: str, mask_of: Callable[[int], Any], names: list[str],
                sources: Sequence[Path], where: str) -> list[str]:
    """Write the ``output_type`` file of the classes ``names`` (``mask_of(k)``: class k on the scan's grid)."""
    import SimpleITK as sitk

    from duplus.atomic import atomic_path

    first = mask_of(0)
    series = read_series(sources, first, where)
    # [slice, row, column, class] in series order: SimpleITK's array axes are z, y (rows), x (columns).
    masks = np.zeros((len(series), first.GetSize()[1], first.GetSize()[0], len(names)), dtype=bool)
    order = [index for _, index in series]
    for k in range(len(names)):
        masks[..., k] = sitk.GetArrayViewFromImage(first if k == 0 else mask_of(k))[order] > 0
    datasets = [dataset for dataset, _ in series]
    target = out / DICOM_OUTPUTS[output_type]
    with atomic_path(target, suffix=".dcm") as tmp:
        if output_type == "dicom_seg":
            _segmentation(datasets, masks, names).save_as(str(tmp))
        else:
            # Not RTStruct.save(), which prints "Writing file to ..." on stdout (kept clean for -q and scripts)
            # and then calls this.
            _structure_set(datasets, masks, names).ds.save_as(str(tmp))
    return [target.name]


def _algorithm() -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name="DuPLUS", family=codes.cid7162.ArtificialIntelligence,
                                              version=__version__)


def _segmentation(datasets: list[Any], masks: np.ndarray, names: list[str]) -> Any:
    import highdicom as hd
    from pydicom.uid import generate_uid

    descriptions = []
    for k, name in enumerate(names):
        code = class_code(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=k + 1, segment_label=name[:64], segmented_property_category=code.category,
            segmented_property_type=code.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm()))
    return hd.seg.Segmentation(
        source_images=datasets, pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=generate_uid(), series_number=_series_number(datasets), sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name="duplus segment",
        software_versions=__version__, device_serial_number="0", series_description="DuPLUS segmentation",
        # Every source slice keeps its frame, empty or not, so each slice of the series has its segment frames.
        omit_empty_frames=False)


def _structure_set(datasets: list[Any], masks: np.ndarray, names: list[str]) -> Any:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.valuerep import DS
    from rt_utils import ds_helper
    from rt_utils.image_helper import get_slice_position
    from rt_utils.rtstruct import RTStruct

    # rt-utils places slice i of a mask at the first slice's position plus i steps along the row x column
    # normal, so its series goes in ascending order along that normal (ITK's slice axis may point the other way).
    ascending = np.argsort([get_slice_position(dataset) for dataset in datasets], kind="stable")
    datasets, masks = [datasets[i] for i in ascending], masks[ascending]
    # rt-utils' own builder reads every file of a folder; the series read here is the one segmented.
    with warnings.catch_warnings(), held_log_records("pydicom"):
        # rt-utils (1.2.7) sets FileDataset.is_little_endian and .is_implicit_VR, which pydicom 3 warns about twice
        # (a log line and a DeprecationWarning); the file is written right all the same (tests/test_segment_dicom.py).
        warnings.filterwarnings("ignore", message=".*will be removed in v4.0", category=DeprecationWarning)
        dataset = ds_helper.create_rtstruct_dataset(datasets)
    structure_set = RTStruct(_spacing_swapped(datasets), dataset)
    structure_set.set_series_description("DuPLUS segmentation")
    structure_set.ds.Manufacturer = MANUFACTURER
    structure_set.ds.SoftwareVersions = __version__
    structure_set.ds.StructureSetLabel = "DuPLUS"
    # Attributes the RT Structure Set IOD requires (type 1 or 2) that rt-utils leaves out: the frame of
    # reference module, and study and series ones, taken from the source series or left empty as type 2 allows.
    structure_set.ds.FrameOfReferenceUID = datasets[0].FrameOfReferenceUID
    for keyword in ("PositionReferenceIndicator", "AccessionNumber", "ReferringPhysicianName"):
        setattr(structure_set.ds, keyword, datasets[0].get(keyword, ""))
    structure_set.ds.OperatorsName = ""
    for k, name in enumerate(names):
        # rt-utils takes [row, column, slice] masks in its series order, which is the order of ``datasets``.
        mask = np.moveaxis(masks[..., k], 0, -1)
        if not mask.any():
            continue  # an empty ROI has no contour for rt-utils to write; the report lists the class
        structure_set.add_roi(mask=mask, name=name[:64], approximate_contours=False,
                              roi_generation_algorithm="AUTOMATIC")
        for contour in structure_set.ds.ROIContourSequence[-1].ContourSequence:
            # rt-utils writes full float reprs; a DICOM decimal string holds at most 16 characters.
            contour.ContourData = [DS(value, auto_format=True) for value in contour.ContourData]
        code = class_code(name).type
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
        structure_set.ds.RTROIObservationsSequence[-1].RTROIIdentificationCodeSequence = DicomSequence([item])
    return structure_set


def _spacing_swapped(datasets: list[Any]) -> list[Any]:
    """Copies of ``datasets`` (without pixel data) whose PixelSpacing has its two values swapped, for rt-utils.

    rt-utils (1.2.7) steps a contour point's column index by PixelSpacing[0], which DICOM defines as the
    spacing between rows (and the row index by PixelSpacing[1]): on non-square pixels its contours come out
    stretched. Handing it the two values swapped puts them right; the UIDs it references are unchanged.
    """
    import copy

    swapped = []
    for dataset in datasets:
        proxy = copy.copy(dataset)  # shallow: the source datasets stay as read
        if "PixelData" in proxy:
            del proxy.PixelData
        row, column = (float(v) for v in dataset.PixelSpacing)
        proxy.PixelSpacing = [column, row]
        swapped.append(proxy)
    return swapped


def _series_number(datasets: list[Any]) -> int:
    number = datasets[0].get("SeriesNumber")
    return int(number) + 1000 if number not in (None, "") else 1000

"""Parsers of raw dataset layouts: each turns a dataset folder into its list of labelled cases.

MSD / nnU-Net folders, CSV lists, and the layouts of BTCV, AMOS, KiTS19, StructSeg, CHAOS, M&Ms, autoPET, HECKTOR.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from duplus.data.registry import DatasetSpec
from duplus.errors import DataError

if TYPE_CHECKING:  # SimpleITK is imported where an image is read, so that listing cases stays light
    import SimpleITK as sitk

# CHAOS ground-truth PNGs encode organs as grey values around 63 / 126 / 189 / 252 (liver, right
# kidney, left kidney, spleen); the challenge's own ranges, which also catch the edge pixels.
CHAOS_GREY = {(55, 70): 1, (110, 135): 2, (175, 200): 3, (240, 255): 4}


@dataclass(frozen=True)
class Case:
    """One labelled case of a raw dataset.

    ``image`` / ``label`` are files or folders (DICOM series, PNG stacks); ``channel`` picks one volume
    of a 4-D image or label; ``label_format`` is ``"image"`` (a label volume on the image grid),
    ``"resample"`` (a label volume on a grid of its own, e.g. HECKTOR's CT grid under a PET image,
    resampled from there straight onto the training grid and scored there) or
    ``"chaos_png"`` (a folder of PNG slices matched to the DICOM files). ``subject`` groups cases of
    one person (two cardiac phases, two studies), which must fall on the same side of the
    train/test split; None: the case is its own subject.
    """

    case_id: str
    image: Path
    label: Path | None
    center: str
    channel: int | None = None
    label_channel: int | None = None
    label_format: str = "image"
    subject: str | None = None


def _strip_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):  # scanners and Windows tools write .NII.GZ too
            return name[: -len(suffix)]
    return name


def _visible_images(folder: Path) -> list[Path]:
    # MSD archives carry macOS "._name" resource forks beside the real files: never images.
    return sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith(".")
                  and _strip_suffix(p.name) != p.name)


def _center(spec: DatasetSpec, fallback: str) -> str:
    return spec.default_center or (spec.centers[0] if spec.centers else fallback)


def _listed_image(listed: Path, channel: int | None) -> tuple[Path, int | None]:
    """(image file, channel within it) of a dataset.json entry.

    nnU-Net v1 lists ``imagesTr/case.nii.gz`` but keeps each channel in ``case_0000.nii.gz``,
    ``case_0001.nii.gz``, ...: then the file of the dataset's channel is the image (a 3-D volume).
    """
    if listed.exists():
        return listed.resolve(), channel
    stem = _strip_suffix(listed.name)
    per_channel = listed.with_name(f"{stem}_{(channel or 0):04d}{listed.name[len(stem):]}")
    if per_channel.exists():
        return per_channel.resolve(), None
    return listed.resolve(), channel  # missing: the integrity check names it


def _lies_under(root: Path, path: Path) -> bool:
    """Whether ``path`` is inside ``root`` as written (``..`` and absolute paths resolved, symlinks not:
    a link inside the root is the dataset's own way of holding a file, and is checksummed through)."""
    return os.path.normpath(os.path.abspath(path)).startswith(os.path.normpath(os.path.abspath(root)) + os.sep)


def files_outside(cases: list[Case], root: Path) -> list[Path]:
    """The image and label files of ``cases`` that lie outside ``root`` (read only when allowed)."""
    files = [p for case in cases for p in (case.image, case.label) if p is not None]
    return [Path(p) for p in files if not _lies_under(root, Path(p))]


def msd_cases(spec: DatasetSpec, root: Path) -> list[Case]:
    """MSD / nnU-Net layout: ``dataset.json`` ``training`` entries, else ``imagesTr``/``labelsTr`` pairs.

    nnU-Net channel suffixes (``case_0000.nii.gz``) are matched to ``labelsTr/case.nii.gz``. A
    ``center`` field of a training entry wins over the dataset's default center.
    """
    index = root / "dataset.json"
    cases: list[Case] = []
    if index.is_file():
        try:
            entries = json.loads(index.read_text(encoding="utf-8")).get("training", [])
        except (json.JSONDecodeError, AttributeError) as error:
            raise DataError(f"{index}: not a valid dataset.json ({error})") from None
        outside = []
        for number, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise DataError(f"{index}: training[{number}] needs 'image' and 'label' paths, got {entry!r}")
            away = [str(entry[key]) for key in ("image", "label") if not _lies_under(root, root / entry[key])]
            if away:
                outside.append(f"training[{number}] ({_strip_suffix(Path(str(entry['image'])).name)}): "
                               f"{', '.join(away)}")
            listed = root / entry["image"]
            case_id = _strip_suffix(listed.name)  # the listed name: a symlink's target may be called anything
            image, channel = _listed_image(listed, spec.channel)
            cases.append(Case(case_id, image, (root / entry["label"]).resolve(),
                              str(entry.get("center") or _center(spec, "default")), channel))
        if outside and not spec.options.get("allow_outside_root"):
            raise DataError(f"{index}: {len(outside)} case(s) list files outside the dataset's root {root}, which "
                            f"its download record would not checksum: {'; '.join(outside)}. Move them under the "
                            f"root, or set datasets.{spec.name}.allow_outside_root: true to read and checksum them "
                            f"with the rest")
        if cases:
            return cases
    images = root / "imagesTr"
    if not images.is_dir():
        raise DataError(f"{root}: expected imagesTr/ (and labelsTr/, dataset.json) of an MSD-style dataset")
    labels = root / "labelsTr"
    for image in _visible_images(images):
        stem = _strip_suffix(image.name)
        suffix = image.name[len(stem):]
        channel_file = re.fullmatch(r"(.+)_(\d{4})", stem)
        if channel_file and not (labels / f"{stem}{suffix}").exists():
            # nnU-Net keeps each input channel in its own file, case_0000, case_0001, ...: one case,
            # whose image is the file of the dataset's channel (0 unless it names another).
            if int(channel_file.group(2)) != (spec.channel or 0):
                continue
            case_id = channel_file.group(1)
            cases.append(Case(case_id, image, labels / f"{case_id}{suffix}", _center(spec, "default"), None))
        else:  # an id that merely ends in four digits keeps them when its label does
            cases.append(Case(stem, image, labels / f"{stem}{suffix}", _center(spec, "default"), spec.channel))
    return cases


def csv_cases(spec: DatasetSpec, root: Path) -> list[Case]:
    """A CSV with columns ``image,label[,center][,case][,subject]``; relative paths are relative to the
    CSV's folder. Rows of one ``subject`` (a patient's several scans) share their train/test split."""
    table = Path(root)
    with open(table, newline="", encoding="utf-8-sig") as handle:  # spreadsheets often add a BOM
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "image" not in columns or "label" not in columns:
            raise DataError(f"{table}: expected columns image,label[,center] (found {', '.join(columns) or 'none'})")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        if not row.get("image"):
            raise DataError(f"{table}: line {number} has no image path")
        image = Path(row["image"]).expanduser()
        image = image if image.is_absolute() else (table.parent / image)
        label = Path(row["label"]).expanduser() if row.get("label") else None
        if label is not None and not label.is_absolute():
            label = table.parent / label
        case_id = row.get("case") or _strip_suffix(image.name)
        if case_id in seen:  # two files with the same name in different folders
            seen[case_id] += 1
            case_id = f"{case_id}_{seen[case_id]}"
        else:
            seen[case_id] = 0
        cases.append(Case(case_id, image, label, row.get("center") or _center(spec, "default"), spec.channel,
                          subject=row.get("subject") or None))
    return cases


def btcv_cases(spec: DatasetSpec, root: Path) -> list[Case]:
    """BTCV (Synapse RawData.zip): ``RawData/Training/img/img0001.nii.gz`` + ``label/label0001.nii.gz``."""
    folder = root / "RawData" / "Training"
    return [Case(image.name[:-7], image, folder / "label" / image.name.replace("img", "label", 1),
                 _center(spec, "btcv")) for image in sorted((folder / "img").glob("img*.nii.gz"))]


def amos_cases(spec: DatasetSpec, root: Path) -> list[Case]:
    """AMOS 2022: ``imagesTr``/``imagesVa`` with labels; ids below 500 are CT, from 500 MRI."""
    want_mri = spec.options.get("modality_filter") == "MRI"
    cases = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesVa", "labelsVa")):
        for image in _visible_images(root / images):
            digits = re.findall(r"\d+", image.name)
            if not digits or (int(digits[-1]) >= 500) != want_mri:
                continue
            cases.append(Case(_strip_suffix(image.name), image, root / labels / image.name, _center(spec, "amos")))
    return cases


def kits_cases(spec: DatasetSpec, root: Path) -> list[Case]:
    """KiTS19: ``data/case_00000/imaging.nii.gz`` + ``segmentation.nii.gz``."""
    return [Case(folder.name, folder / "imaging.nii.gz", folder / "segmentation.nii.gz", _center(spec, "kits"))
            # The starter code downloads imaging for 300 cases; only 210 have a segmentation.
            for folder in sorted((root / "data").glob("case_*"))
            if (folder / "imaging.nii.gz").exists() and (folder / "segmentation.nii.gz").exists()]


def structseg_cases(spec: DatasetSpec, root: Path) -> list[Case]:
    """StructSeg 2019: ``<Task folder>/<n>/data.nii.gz`` + ``label.nii.gz`` (task folder from the spec)."""
    pattern = spec.source.required[0][0] if spec.source.required else "*/*/data.nii.gz"
    images = sorted(root.glob(pattern), key=lambda p: (len(p.parent.name), p.parent.name))
    return [Case(f"case_{image.parent.name}", image, image.parent / "label.nii.gz", _center(spec, "structseg"))
            for image in images]


def chaos_cases(spec: DatasetSpec, root: Path) -> list[Case]:
    """CHAOS MR: DICOM folders with PNG ground truth (T1DUAL in/out phase share one ground truth)."""
    variant = spec.options.get("sequence", "t2")
    sub = {"t2": ("T2SPIR", "DICOM_anon"), "t1_in": ("T1DUAL", "DICOM_anon/InPhase"),
           "t1_out": ("T1DUAL", "DICOM_anon/OutPhase")}[variant]
    cases = []
    for patient in sorted((root / "MR").glob("*"), key=lambda p: (len(p.name), p.name)):
        image = patient / sub[0] / sub[1]
        if image.is_dir():
            cases.append(Case(f"chaos_{patient.name}", image, patient / sub[0] / "Ground", _center(spec, "chaos"),
                              label_format="chaos_png"))
    return cases


def mnms_cases(spec: DatasetSpec, root: Path) -> list[Case]:
    """M&Ms: 4-D cine ``<code>_sa.nii.gz`` with ``<code>_sa_gt.nii.gz``; one case per ED and ES frame."""
    tables = sorted((root / "OpenDataset").glob("*.csv"))
    if not tables:
        raise DataError(f"{root / 'OpenDataset'}: the M&Ms information CSV (External code, Centre, ED, ES) is missing")
    with open(tables[0], newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("External code", "ED", "ES") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{tables[0]}: the M&Ms information CSV lacks column(s) {missing}")
        info = {(row["External code"] or "").strip(): row for row in reader}
    cases = []
    for folder in sorted((root / "OpenDataset" / "Training" / "Labeled").glob("*")):
        code = folder.name
        row = info.get(code)
        if row is None:
            raise DataError(f"{tables[0]}: no row for M&Ms subject '{code}' (column 'External code')")
        center = f"centre{str(row.get('Centre', '')).strip() or 'unknown'}"
        for phase in ("ED", "ES"):
            try:
                frame = int(float(row[phase]))
            except (TypeError, ValueError):
                raise DataError(f"{tables[0]}: subject '{code}' has no frame number in column '{phase}' "
                                f"(got {row[phase]!r})") from None
            cases.append(Case(f"{code}_{phase.lower()}", folder / f"{code}_sa.nii.gz", folder / f"{code}_sa_gt.nii.gz",
                              center, channel=frame, label_channel=frame, subject=code))
    return cases


def autopet_cases(spec: DatasetSpec, root: Path) -> list[Case]:
    """autoPET NIfTI: ``FDG-PET-CT-Lesions/<patient>/<study>/SUV.nii.gz`` + ``SEG.nii.gz``."""
    return [Case(f"{suv.parent.parent.name}_{suv.parent.name}".replace(" ", "_"), suv, suv.parent / "SEG.nii.gz",
                 _center(spec, "autopet"), subject=suv.parent.parent.name)
            for suv in sorted(root.glob("FDG-PET-CT-Lesions/*/*/SUV.nii.gz"))]


def hecktor_cases(spec: DatasetSpec, root: Path) -> list[Case]:
    """HECKTOR 2022: ``imagesTr/<case>__CT.nii.gz`` and ``__PT.nii.gz`` with ``labelsTr/<case>.nii.gz``.

    The dataset's ``scan`` option (``CT`` or ``PT``) picks the image. Cases are listed by their label
    files, so the CT and the PET dataset list the same patients, and the train/test split (drawn from
    case ids and centers alone) puts each patient's two scans on the same side; a missing scan is
    reported by the integrity check, naming the file. The label is drawn on the CT grid and read on
    its own grid (``label_format="resample"``) for both scans: HECKTOR does not promise that a
    label's header equals its CT's, and preprocessing resamples it straight onto the training grid.
    """
    scan = spec.options.get("scan", "PT")
    cases = []
    for label in _visible_images(root / "labelsTr"):
        case_id = _strip_suffix(label.name)
        center = case_id.split("-")[0] if "-" in case_id else "hecktor"
        cases.append(Case(case_id, root / "imagesTr" / f"{case_id}__{scan}.nii.gz", label, center,
                          label_format="resample"))
    return cases


LAYOUTS: dict[str, Callable[[DatasetSpec, Path], list[Case]]] = {
    "msd": msd_cases, "csv": csv_cases, "btcv": btcv_cases, "amos": amos_cases, "kits": kits_cases,
    "structseg": structseg_cases, "chaos": chaos_cases, "mnms": mnms_cases, "autopet": autopet_cases,
    "hecktor": hecktor_cases,
}


def list_cases(spec: DatasetSpec, root: str | Path) -> list[Case]:
    """Every labelled case of ``spec`` under ``root`` (sorted by case id); ``DataError`` if there is none."""
    root = Path(root)
    if spec.layout not in LAYOUTS:
        raise DataError(f"dataset {spec.name}: no parser for layout '{spec.layout}'")
    if not root.exists():
        raise DataError(f"dataset {spec.name}: raw folder {root} does not exist (run the download stage)")
    cases = sorted(LAYOUTS[spec.layout](spec, root), key=lambda case: case.case_id)
    if not cases:
        raise DataError(f"dataset {spec.name}: no cases found under {root} for layout '{spec.layout}'")
    ids = [case.case_id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"dataset {spec.name}: case ids appear more than once under {root}: {', '.join(duplicates)}")
    return cases


def _chaos_label(case: Case, image: "sitk.Image") -> "sitk.Image":
    import SimpleITK as sitk

    from duplus.data.image_io import read_png_label_stack

    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(case.image))
    dicoms = [Path(f) for f in max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(case.image), s)
                                    for s in series), key=len)]
    pngs = sorted(p for p in Path(case.label).glob("*.png") if not p.name.startswith("."))
    by_stem = {p.stem: p for p in pngs}
    if all(d.stem in by_stem for d in dicoms):
        ordered = [by_stem[d.stem] for d in dicoms]
    else:
        # Names differ (T1 in/out phase share one ground truth): slice k of the name-sorted PNGs
        # belongs to the k-th DICOM file by name; reorder both into the reader's slice order.
        if len(pngs) != len(dicoms):
            raise DataError(f"{case.label}: {len(pngs)} PNG label slices for {len(dicoms)} DICOM slices "
                            f"of case {case.case_id}")
        by_name = dict(zip(sorted(dicoms, key=lambda d: d.name), pngs))
        ordered = [by_name[d] for d in dicoms]
    return read_png_label_stack(ordered, image, CHAOS_GREY)


def _check_label_values(label: "sitk.Image", case: Case) -> None:
    import SimpleITK as sitk

    values = np.unique(sitk.GetArrayViewFromImage(label))
    bad = [v for v in values if v != np.round(v) or not 0 <= v <= 255]
    if bad:
        shown = ", ".join(f"{float(v):g}" for v in bad[:5])
        raise DataError(f"{case.label}: label of case {case.case_id} holds values that are not label ids 0..255: {shown}")


def read_case(case: Case) -> tuple["sitk.Image", "sitk.Image | None"]:
    """Read a case's image and label as 3-D images.

    A label of ``label_format="resample"`` comes on its own grid, checked to hold label ids: every
    later step resamples it from there (preprocessing onto the training grid), never by way of the
    image's grid, where a nearest-neighbour copy would lose or grow structures smaller than its voxels.
    """
    from duplus.data.image_io import read_image

    image = read_image(case.image, channel=case.channel)
    if case.label is None:
        return image, None
    if case.label_format == "chaos_png":
        if not Path(case.label).is_dir():
            raise DataError(f"{case.label}: label folder of case {case.case_id} not found")
        return image, _chaos_label(case, image)
    label = read_image(case.label, channel=case.label_channel)
    if case.label_format == "resample":
        _check_label_values(label, case)  # before a cast to 8 bits would hide 1.5 or 258
    return image, label

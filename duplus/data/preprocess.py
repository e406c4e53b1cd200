"""Preprocessing stage: integrity check, then per case reorient, resample, crop, normalise into the array store.

Outputs are staged and moved into place only when every case succeeded, so a failed run leaves earlier outputs intact;
the cases it finished stay staged and a rerun reuses them (``duplus.data.staging``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk

from duplus.atomic import atomic_path, save_npy, write_json
from duplus.data import geometry as geo
from duplus.data.image_io import read_image, write_image
from duplus.data.integrity import check_cases, init_worker, worker_context
from duplus.data.intensity import apply_box, body_mask, crop_box, normalize
from duplus.data.labelmap import LabelValues, label_values, summarize_undeclared
from duplus.data.layouts import Case, list_cases, read_case
from duplus.data.manifest import write_manifest
from duplus.data.registry import DatasetSpec, get_dataset
from duplus.data.staging import STAGING, case_key, clear_case, mark_done, raw_file_hashes, staged_row
from duplus.errors import DataError
from duplus.hashing import package_source_sha256
from duplus.progress import progress
from duplus.settings import Settings, filled_config, schema

log = logging.getLogger(__name__)

MAX_LOCATIONS = 4096


def settings(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``preprocess`` section with the schema's defaults filled in (which bounds every value), and the
    image interpolation (linear; labels are resampled nearest-neighbour)."""
    section = filled_config(config)["preprocess"]
    # Values as written, in the schema's key order: the preprocessing record holds them as the pipeline's
    # validated config gave them.
    return {**{key: section[key] for key in schema()["properties"]["preprocess"]["properties"]},
            "interpolation": "linear"}


def _stable_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def transform_case(image: sitk.Image, label: sitk.Image | None, modality: str, options: Mapping[str, Any],
                   crop: bool, label_in_crop: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Reorient, resample, (crop), normalise; returns arrays in (Z, Y, X) order and the restore metadata.

    The label is resampled (nearest neighbour) from its own grid, which need not be the image's
    (HECKTOR's CT-grid label under a PET scan), straight onto the image's target grid.

    The crop box covers the body and, with ``label_in_crop`` (training cases), every labelled
    voxel. Test cases are cropped by the body alone: a box drawn around the ground truth would tell
    the evaluated model where the answer is not (no false positive could land outside it).
    """
    original = geo.geometry_of(image)
    code = geo.orientation_code(image)
    image_lps = geo.reorient_lps(image)
    grid = geo.target_grid(image_lps, options["spacing"])
    low = float(sitk.GetArrayViewFromImage(image_lps).min())
    resampled = geo.resample(geo.with_edge_margin(image_lps, grid["spacing"]), grid,
                             options.get("interpolation", "linear"), default=low, pixel=sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(resampled)
    label_array = None
    if label is not None:
        label_lps = geo.resample(geo.with_edge_margin(geo.reorient_lps(label), grid["spacing"]), grid, "nearest", 0,
                                 label.GetPixelID())
        label_array = sitk.GetArrayFromImage(label_lps)
        if label_array.size and (label_array.min() < 0 or label_array.max() > 255):
            raise DataError(f"label values must lie in 0..255 to be stored as uint8, found {label_array.max()}")
        label_array = label_array.astype(np.uint8)
    mask = body_mask(array, modality)
    box = crop_box(mask, label_array if label_in_crop else None) if crop else [[0, int(n)] for n in array.shape]
    array, mask = apply_box(array, box), apply_box(mask, box)
    if label_array is not None:
        label_array = np.ascontiguousarray(apply_box(label_array, box))
    normalized, stats = normalize(array, mask, modality, options["ct_window"], options["percentiles"])
    meta = {"modality": modality, "original": {**original, "orientation": code,
                                               "pixel_type": image.GetPixelIDTypeAsString()},
            "resampled": grid, "target_spacing": [float(s) for s in options["spacing"]], "crop_box": box,
            "shape": [int(n) for n in normalized.shape], "normalization": stats,
            "interpolation": options.get("interpolation", "linear")}
    return np.ascontiguousarray(normalized), label_array, meta


def prepare_image(image: sitk.Image, modality: str, config: Mapping[str, Any] | None, crop: bool = False
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """Preprocess a new scan exactly as in training (reorient, resample, normalise; no crop by default).

    Returns the float32 (Z, Y, X) array and the metadata :func:`duplus.data.restore.restore_to_original` needs.
    """
    if modality not in ("CT", "MRI", "PET"):
        raise DataError(f"modality '{modality}' is not one of CT, MRI, PET")
    array, _, meta = transform_case(image, None, modality, settings(config), crop)
    return array, meta


def unseen_labels(out_dir: Path, rows: list[dict[str, Any]], label_ids: list[int]) -> list[int]:
    """Declared label ids that no case's label holds (from the stored locations, no label re-read)."""
    seen: set[int] = set()
    for row in rows:
        with np.load(out_dir / row["locations"]) as found:
            seen |= {int(key) for key in found.files if key != "0" and len(found[key])}
    return [label_id for label_id in label_ids if label_id not in seen]


def sample_locations(label: np.ndarray, label_ids: list[int], seed: int) -> dict[str, np.ndarray]:
    """Per label id up to ``MAX_LOCATIONS`` voxel indices (int32 (N, 3), Z Y X), drawn reproducibly."""
    rng = np.random.default_rng(seed)
    found = {}
    # One pass over the volume: flat indices (C order, as argwhere gives them) of every labelled voxel, and values.
    foreground = np.flatnonzero(label)
    values = label.ravel()[foreground]
    for label_id in label_ids:
        if label_id == 0:
            where = np.argwhere(label == label_id)
        else:
            where = np.stack(np.unravel_index(foreground[values == label_id], label.shape), axis=1)
        if len(where) > MAX_LOCATIONS:
            where = where[np.sort(rng.choice(len(where), MAX_LOCATIONS, replace=False))]
        found[str(label_id)] = where.astype(np.int32).reshape(-1, 3)
    return found


def declared_label(label: sitk.Image, values: LabelValues) -> tuple[sitk.Image, dict[int, int]]:
    """``label`` with undeclared values set to background and values renumbered for the store, and
    {undeclared value: voxels}; the label itself when nothing changes."""
    array = sitk.GetArrayViewFromImage(label)
    stored, undeclared = values.apply(array)
    if stored is array:
        return label, undeclared
    result = sitk.GetImageFromArray(stored)
    result.CopyInformation(label)
    return result, undeclared


def _originals(case: Case, image: sitk.Image, label: sitk.Image, folder: Path,
               renumbered: bool = False) -> tuple[str, str]:
    """Absolute paths of 3-D originals; volumes picked from 4-D files or PNG stacks get a NIfTI copy.

    A label whose values were renumbered for the store (values above 255) gets a copy with the
    stored ids, so that evaluation reads the ids the manifest names.

    A label on a grid of its own (``label_format="resample"``) stays the file as drawn: evaluation
    scores on the label's own grid.
    """
    raw_image, raw_label = str(Path(case.image).resolve()), str(Path(case.label).resolve())
    if case.channel is not None or Path(case.image).is_dir():
        write_image(image, folder / "image_original.nii.gz")
        raw_image = str((folder / "image_original.nii.gz").resolve())
    if case.label_format == "resample":
        if case.label_channel is not None:  # the chosen volume, still on the label's own grid
            write_image(read_image(case.label, channel=case.label_channel), folder / "label_original.nii.gz")
            raw_label = str((folder / "label_original.nii.gz").resolve())
    elif case.label_channel is not None or case.label_format != "image" or renumbered:
        write_image(label, folder / "label_original.nii.gz")
        raw_label = str((folder / "label_original.nii.gz").resolve())
    return raw_image, raw_label


def process_case(case: Case, spec: DatasetSpec, options: Mapping[str, Any], seed: int, staging: str,
                 final_dir: str, split: str = "train") -> dict[str, Any]:
    """Preprocess one case into ``staging/<case>/``; returns its manifest row (``duplus.data.manifest``; paths as
    they will be after the move)."""
    try:
        image, label = read_case(case)
        if label is None:
            raise DataError("has no label file")
        values = label_values(spec.labels)
        label, undeclared = declared_label(label, values)
        crop = bool(options["crop_foreground"])
        array, label_array, meta = transform_case(image, label, spec.modality, options, crop,
                                                  label_in_crop=split == "train")
    except DataError as error:
        raise DataError(f"dataset {spec.name}, case {case.case_id}: {error}") from None
    folder = Path(staging) / case.case_id
    save_npy(folder / "image.npy", array)
    assert label_array is not None  # a label went in, so one came out
    save_npy(folder / "label.npy", label_array)
    locations = sample_locations(label_array, sorted(values.classes), _stable_int(seed, spec.name, case.case_id))
    with atomic_path(folder / "locations.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, **locations)
    final_folder = Path(final_dir) / case.case_id
    raw_image, raw_label = _originals(case, image, label, folder, renumbered=values.renumbered)
    raw_image = raw_image.replace(str(folder.resolve()), str(final_folder.resolve()))
    raw_label = raw_label.replace(str(folder.resolve()), str(final_folder.resolve()))
    meta.update({"dataset": spec.name, "case": case.case_id, "center": case.center, "sequence": spec.sequence,
                 "region": spec.region, "labels": {str(k): v for k, v in values.classes.items()},
                 "raw_image": raw_image, "raw_label": raw_label, "split": split,
                 "present_labels": [int(v) for v in np.flatnonzero(np.bincount(label_array.ravel())) if v]})
    if undeclared:
        meta["background_values"] = {str(k): n for k, n in sorted(undeclared.items())}
    write_json(folder / "meta.json", meta)
    return {"dataset": spec.name, "case": case.case_id, "center": case.center, "modality": spec.modality,
            "sequence": spec.sequence or "", "region": spec.region, "image": f"{case.case_id}/image.npy",
            "label": f"{case.case_id}/label.npy", "meta": f"{case.case_id}/meta.json",
            "locations": f"{case.case_id}/locations.npz", "shape": "x".join(map(str, array.shape)),
            "labels": json.dumps({str(k): v for k, v in values.classes.items()}), "raw_image": raw_image,
            "raw_label": raw_label, "split": split,
            # Not a manifest column: what run_preprocess counts into its log (kept in a staged case's row).
            "background_values": {str(k): n for k, n in undeclared.items()}}


def _stage_case(case: Case, spec: DatasetSpec, options: Mapping[str, Any], seed: int, staging: str,
                final_dir: str, split: str, key: str | None) -> tuple[dict[str, Any], bool]:
    """(manifest row, whether it was staged already): a complete staged case under the same key is
    taken as it is; anything else is preprocessed afresh (``duplus.data.staging``)."""
    row = staged_row(Path(staging), case.case_id, key)
    if row is not None:
        return row, True
    clear_case(Path(staging), case.case_id)
    row = process_case(case, spec, options, seed, staging, final_dir, split)
    mark_done(Path(staging), case.case_id, key, row)
    return row, False


def assign_splits(rows: list[dict[str, Any]], seed: int, test_fraction: float) -> None:
    """Set ``split`` per row: per center, a deterministic ``test_fraction`` of subjects (>= 1 if the
    center has >= 2), each with all its cases (``subject``; a row without one is its own subject),
    so no person is in both the training and the test split."""
    by_center: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        subject = str(row.get("subject") or row["case"])
        by_center.setdefault(row["center"], {}).setdefault(subject, []).append(row)
    for subjects in by_center.values():
        ordered = sorted(subjects, key=lambda name: (_stable_int(seed, "split", name), name))
        count = len(ordered)
        n_test = int(round(test_fraction * count))
        if test_fraction > 0 and count >= 2:
            n_test = min(max(n_test, 1), count - 1)
        for position, subject in enumerate(ordered):
            for row in subjects[subject]:
                row["split"] = "test" if position < n_test else "train"


def _install(staging: Path, out_dir: Path, case_ids: list[str]) -> None:
    """Move staged case folders into ``out_dir``, replacing older ones; drop case folders of vanished cases."""
    trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=out_dir))
    try:
        for case_id in case_ids:
            target = out_dir / case_id
            if target.exists():
                os.replace(target, trash / case_id)
            os.replace(staging / case_id, target)
        keep = set(case_ids)
        for folder in out_dir.iterdir():
            if folder.is_dir() and not folder.name.startswith(".") and folder.name not in keep \
                    and (folder / "meta.json").exists():
                os.replace(folder, trash / folder.name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _log_background_values(dataset: str, rows: list[dict[str, Any]]) -> None:
    """Say which label values datasets.<name>.labels left out, and in how many cases: taken as background."""
    voxels: dict[int, int] = {}
    cases = 0
    for row in rows:
        found = row.get("background_values") or {}
        cases += bool(found)
        for value, count in found.items():
            voxels[int(value)] = voxels.get(int(value), 0) + int(count)
    if voxels:
        log.info("preprocess %s: label %s of %d case(s) are not in datasets.%s.labels: taken as background",
                 dataset, summarize_undeclared(voxels), cases, dataset)


def run_preprocess(dataset: str, config: Mapping[str, Any], download_record: str | os.PathLike,
                   out_manifest: str | os.PathLike, threads: int = 1) -> pd.DataFrame:
    """Preprocess every case of ``dataset`` into ``out_manifest``'s folder and write ``manifest.csv``."""
    record_path = Path(download_record)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{record_path}: cannot read the download record ({error}); run the download stage") from None
    if record.get("dataset") != dataset:
        raise DataError(f"{record_path}: records dataset '{record.get('dataset')}', expected '{dataset}'")
    spec = get_dataset(dataset, config)
    options = settings(config)
    seed = Settings.of(config).seed
    cases = list_cases(spec, record["root"])
    for case in cases:
        if os.sep in case.case_id or case.case_id.startswith("."):
            raise DataError(f"dataset {dataset}: case id '{case.case_id}' cannot be used as a folder name")
    threads = max(1, int(threads or 1))
    check_cases(dataset, cases, threads=threads)
    out_dir = Path(out_manifest).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(".staging-*"), *out_dir.glob(".trash-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run of an older layout or its install
    staging = out_dir / STAGING  # kept across a killed run: finished cases are not redone
    staging.mkdir(exist_ok=True)
    # Splits depend only on case ids and centers; known first, they decide how each case is cropped.
    stubs = [{"case": case.case_id, "center": case.center, "subject": case.subject} for case in cases]
    assign_splits(stubs, seed, float(options["test_fraction"]))
    hashes = raw_file_hashes(record)
    # test_fraction only decides splits, and each case's split is keyed by itself.
    common = {"options": {k: v for k, v in options.items() if k != "test_fraction"}, "seed": seed,
              "dataset": spec.name, "modality": spec.modality, "region": spec.region, "sequence": spec.sequence,
              "labels": {str(k): v for k, v in spec.labels.items()},
              "final_dir": str(out_dir.resolve()), "source": package_source_sha256()}
    args = [(case, spec, options, seed, str(staging), str(out_dir), stub["split"],
             case_key(case, hashes, {**common, "split": stub["split"]})) for case, stub in zip(cases, stubs)]
    if threads > 1 and len(cases) > 1:
        with ProcessPoolExecutor(max_workers=min(threads, len(cases)), mp_context=worker_context(),
                                 initializer=init_worker) as pool:
            futures = [pool.submit(_stage_case, *a) for a in args]
            results = [f.result() for f in progress(futures, desc=f"preprocess {dataset}", total=len(futures))]
    else:
        results = [_stage_case(*a) for a in progress(args, desc=f"preprocess {dataset}")]
    rows = [row for row, _ in results]
    reused = sum(1 for _, was_staged in results if was_staged)
    if reused:
        log.info("preprocess %s: %d of %d cases staged by an interrupted run were reused", dataset, reused, len(rows))
    _install(staging, out_dir, [row["case"] for row in rows])
    shutil.rmtree(staging, ignore_errors=True)
    frame = write_manifest(out_manifest, rows)
    _log_background_values(dataset, rows)
    stored = label_values(spec.labels)
    unseen = unseen_labels(out_dir, rows, sorted(stored.classes))
    if unseen:
        named = ", ".join(f"{i} ({stored.classes[i]})" for i in unseen)
        log.warning("preprocess %s: label id(s) %s of datasets.%s.labels occur in none of its %d cases; training "
                    "takes these classes as absent from every scan of %s (remove them if it does not annotate "
                    "them)", dataset, named, dataset, len(rows), dataset)
    log.info("preprocessed %s: %d cases (%d test) into %s", dataset, len(frame), int((frame["split"] == "test").sum()),
             out_dir)
    return frame

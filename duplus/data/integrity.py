"""Integrity check of a dataset's cases before any expensive work: every problem, by case and file, at once.

Missing files, unreadable or non-3-D volumes, NaN/Inf, constant images, mismatched label grids, and labels that
are intensity images (non-integer, negative or thousands of distinct values).
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from duplus.data.labelmap import MAX_LABEL_VALUES
from duplus.data.layouts import Case, read_case
from duplus.errors import DataError, IntegrityError
from duplus.progress import progress

log = logging.getLogger(__name__)

SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4
MAX_LISTED = 200
MAX_VALUES = 10  # undeclared label values named per case


def _vector(values: Any, digits: int) -> str:
    """``(1.5, 1.5, 3.0)``: rounded, as plain numbers (numpy 2 prints its scalars as ``np.float64(1.5)``)."""
    return "(" + ", ".join(f"{round(float(v), digits):g}" for v in values) + ")"


def geometry_mismatch(image: sitk.Image, label: sitk.Image) -> list[str]:
    """What differs between the grids of ``image`` and ``label`` (empty when they match within tolerance)."""
    return grid_mismatch(_geometry(image), _geometry(label))


def grid_mismatch(image: Mapping[str, Any], label: Mapping[str, Any]) -> list[str]:
    """:func:`geometry_mismatch` on geometry records (size, spacing, origin, direction), e.g. a meta's original grid."""
    problems = []
    size_i, size_l = tuple(int(s) for s in image["size"]), tuple(int(s) for s in label["size"])
    if size_i != size_l:
        problems.append(f"size {size_l} != image size {size_i}")
    spacing_i, spacing_l = np.array(image["spacing"], dtype=float), np.array(label["spacing"], dtype=float)
    if not np.allclose(spacing_i, spacing_l, rtol=SPACING_RTOL, atol=1e-6):
        problems.append(f"spacing {_vector(spacing_l, 5)} != image spacing {_vector(spacing_i, 5)}")
    # Origins may differ by rounding in the writer; a fraction of a voxel is never rounding.
    origin_tol = max(ORIGIN_ATOL_MM, 1e-3 * float(spacing_i.min()))
    if not np.allclose(image["origin"], label["origin"], rtol=0, atol=origin_tol):
        problems.append(f"origin {_vector(label['origin'], 4)} != image origin {_vector(image['origin'], 4)}")
    if not np.allclose(image["direction"], label["direction"], rtol=0, atol=DIRECTION_ATOL):
        problems.append(f"direction {_vector(label['direction'], 4)} != image direction "
                        f"{_vector(image['direction'], 4)}")
    return problems


def _geometry(image: sitk.Image) -> dict[str, Any]:
    return {"size": image.GetSize(), "spacing": image.GetSpacing(), "origin": image.GetOrigin(),
            "direction": image.GetDirection()}


def _extent_overlaps(image: sitk.Image, label: sitk.Image) -> bool:
    def box(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
        size = img.GetSize()
        corners = [img.TransformContinuousIndexToPhysicalPoint([c[i] * (size[i] - 1) for i in range(3)])
                   for c in np.ndindex(2, 2, 2)]
        return np.min(corners, axis=0), np.max(corners, axis=0)

    (lo_a, hi_a), (lo_b, hi_b) = box(image), box(label)
    return bool(np.all(lo_a <= hi_b) and np.all(lo_b <= hi_a))


def _listing(values: Sequence[int]) -> str:
    """``values [7, 9]``, or the first few and a count: an intensity image given as the label holds
    thousands of distinct values, which would make one line of the report tens of kilobytes long."""
    if len(values) <= MAX_VALUES:
        return f"values {list(values)}"
    return f"{len(values)} distinct values ({', '.join(map(str, values[:MAX_VALUES]))}, ..., {values[-1]})"


def case_problems(case: Case) -> list[str]:
    """Every problem of one case, each naming the case id and the file at fault.

    Label values the dataset does not declare are no problem: they are background (a config may
    name a subset of an atlas), counted when the case is preprocessed.
    """
    prefix = f"case {case.case_id}"
    problems: list[str] = []
    if not case.image.exists():
        problems.append(f"{prefix}: image {case.image} not found")
    if case.label is None:
        problems.append(f"{prefix}: has no label file")
    elif not case.label.exists():
        problems.append(f"{prefix}: label {case.label} not found (expected beside image {case.image.name})")
    if problems:
        return problems
    try:
        image, label = read_case(case)
    except DataError as error:
        return [f"{prefix}: {error}"]
    assert label is not None
    if case.label_format == "resample":  # read on its own grid
        if not _extent_overlaps(image, label):
            problems.append(f"{prefix}: label {case.label} lies outside the physical extent of image {case.image}")
    elif case.label_format == "image":
        for mismatch in geometry_mismatch(image, label):
            problems.append(f"{prefix}: label {case.label} grid does not match image {case.image}: {mismatch}")
    pixels = sitk.GetArrayViewFromImage(image)
    if float(pixels.max()) == float(pixels.min()):
        problems.append(f"{prefix}: image {case.image} is constant (every voxel = {float(pixels.min()):g})")
    values = sitk.GetArrayViewFromImage(label)
    unique = np.unique(values)
    swapped = "an intensity image given as the label (image and label swapped)?"
    if not np.all(np.equal(np.mod(unique, 1), 0)):
        examples = unique[np.mod(unique, 1) != 0][:3]
        problems.append(f"{prefix}: label {case.label} holds non-integer values (e.g. {examples}): {swapped}")
    elif unique.size and unique[0] < 0:
        problems.append(f"{prefix}: label {case.label} holds negative values (e.g. {int(unique[0])}): {swapped}")
    elif len(unique) > MAX_LABEL_VALUES:
        problems.append(f"{prefix}: label {case.label} holds {_listing([int(v) for v in unique])}, more than any "
                        f"label map ({MAX_LABEL_VALUES}): {swapped}")
    return problems


def worker_context() -> BaseContext:
    """Start method of worker pools: fork where available, so a job script without a main guard is not re-run."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def init_worker() -> None:
    """Each worker process runs its filters on one thread: the pool itself is the parallelism."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _check_one(case: Case) -> list[str]:
    try:
        return case_problems(case)
    except Exception as error:  # noqa: BLE001 - any reader failure is a problem of this case, reported with the rest
        return [f"case {case.case_id}: {case.image}: unexpected error while checking: {error}"]


def check_cases(dataset: str, cases: Iterable[Case], threads: int = 1) -> int:
    """Check every case; raise ``IntegrityError`` listing all problems by case and file. Returns the case count."""
    cases = list(cases)
    jobs = cases
    problems: list[str] = []
    if threads > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(threads, len(jobs)), mp_context=worker_context(),
                                 initializer=init_worker) as pool:
            for found in progress(pool.map(_check_one, jobs), desc=f"check {dataset}", total=len(jobs)):
                problems.extend(found)
    else:
        for job in progress(jobs, desc=f"check {dataset}"):
            problems.extend(_check_one(job))
    if problems:
        listed = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise IntegrityError(f"dataset {dataset}: {len(problems)} problem(s) in {len(cases)} cases:\n  "
                             + "\n  ".join(listed) + more)
    log.info("dataset %s: %d cases passed the integrity check", dataset, len(cases))
    return len(cases)

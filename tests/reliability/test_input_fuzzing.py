"""Bad input: fuzzed NIfTI headers and EHR tables give a valid result or a ``DuplusError``, nothing else.

Expectation "image-input-validated": a NIfTI file with zero, negative, NaN or infinite spacing, a
non-orthogonal or degenerate direction, 2-D or 4-D shape, an unusual voxel type (int64, uint32, ...)
or NaN voxels is either read by ``duplus.data.image_io.read_image`` into a checked 3-D image that
``duplus.data.preprocess.prepare_image`` turns into a finite float32 volume, or refused with a
``DuplusError`` naming the file. No other exception (RuntimeError from ITK, ZeroDivisionError,
MemoryError, ...) and no NaN reaches the network.

Expectation "ehr-input-validated": an EHR table with random cell types, missing values and duplicate
ids is either refused with ``EHRError`` or comes back with unique string ids, finite non-negative
times, 0/1 events, float numerics, 0/1/NaN binaries and string/None categories.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from duplus.errors import DuplusError, EHRError

# Small by default (the suite runs on every `make test`); DUPLUS_FUZZ_EXAMPLES=2000 for a deeper search.
DEEP = int(os.environ.get("DUPLUS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=DEEP or 40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
CONFIG = {"preprocess": {"spacing": [4.0, 4.0, 4.0], "ct_window": [-991, 500], "percentiles": [2, 98]}}

SPACINGS = st.sampled_from([0.0, -1.5, math.nan, math.inf, 1e-6, 0.7, 1.0, 2.5, 6.0])
DTYPES = st.sampled_from(["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "float32", "float64"])


@st.composite
def nifti_headers(draw: st.DrawFn) -> dict[str, Any]:
    ndim = draw(st.sampled_from([2, 3, 3, 3, 4]))
    shape = [draw(st.integers(1, 9)) for _ in range(min(ndim, 3))]
    if ndim == 4:
        shape.append(draw(st.integers(1, 3)))
    direction = draw(st.sampled_from(["identity", "permuted", "rotated", "sheared", "degenerate"]))
    return {
        "shape": tuple(shape),
        "dtype": draw(DTYPES),
        "spacing": [draw(SPACINGS) for _ in range(3)],
        "direction": direction,
        "sform_code": draw(st.sampled_from([0, 1, 2])),
        "qform_code": draw(st.sampled_from([0, 1])),
        "nan_voxels": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _linear(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "identity":
        return np.eye(3)
    if kind == "permuted":
        return np.eye(3)[[1, 2, 0]] * np.array([[-1.0], [1.0], [1.0]])
    if kind == "rotated":
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        return q
    if kind == "sheared":
        return np.array([[1.0, 0.6, 0.0], [0.0, 1.0, 0.3], [0.2, 0.0, 1.0]])
    return np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # two equal axes: singular


def write_nifti(header: dict[str, Any], path: Path) -> Path:
    rng = np.random.default_rng(header["seed"])
    dtype = np.dtype(header["dtype"])
    if dtype.kind == "f":
        data = rng.normal(0, 100, size=header["shape"]).astype(dtype)
        if header["nan_voxels"]:
            data.flat[0] = np.nan
    else:
        info = np.iinfo(dtype)
        low, high = max(info.min, -1000), min(info.max, 1000)
        data = rng.integers(low, high, size=header["shape"], endpoint=True).astype(dtype)
    spacing = np.array(header["spacing"], dtype=float)
    # The qform must be a rotation (nibabel stores it as a quaternion), so it gets the direction
    # when that is one and a usable scale; the sform rows are written raw and may be sheared or
    # singular; the invalid spacing goes into pixdim, where readers take the voxel size from.
    usable = np.where(np.isfinite(spacing) & (spacing != 0), spacing, 1.0)
    linear = _linear(header["direction"], rng)
    rotation = linear if header["direction"] in ("identity", "permuted", "rotated") else np.eye(3)
    qform, sform = np.eye(4), np.eye(4)
    qform[:3, :3], sform[:3, :3] = rotation * usable, linear * usable
    qform[:3, 3] = sform[:3, 3] = [-10.0, 5.0, 30.0]
    nifti_header = nibabel.Nifti1Header()
    nifti_header.set_data_shape(data.shape)
    nifti_header.set_data_dtype(dtype)
    nifti_header.set_qform(qform, code=header["qform_code"])
    for axis, row in zip("xyz", sform[:3]):
        nifti_header[f"srow_{axis}"] = row
    nifti_header["sform_code"] = header["sform_code"]
    pixdim = nifti_header["pixdim"]
    pixdim[1:4] = spacing
    nifti_header["pixdim"] = pixdim
    image = nibabel.Nifti1Image(data, None, header=nifti_header)  # no affine: the header is kept as set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nibabel.save(image, str(path))
    return path


def _check_prepared(array: np.ndarray, meta: dict[str, Any]) -> None:
    assert array.dtype == np.float32 and array.ndim == 3 and array.size > 0
    assert np.isfinite(array).all(), "non-finite voxels after preprocessing"
    assert all(np.isfinite(s) and s > 0 for s in meta["original"]["spacing"])


@FUZZ
@given(header=nifti_headers(), modality=st.sampled_from(["CT", "MRI", "PET"]), gz=st.booleans())
# Found by the fuzzer: micrometre voxels once asked the edge margin for millions of voxels.
@example(header={"shape": (1, 1, 1), "dtype": "uint8", "spacing": [0.0, 1e-06, 1e-06], "direction": "identity",
                 "sform_code": 0, "qform_code": 0, "nan_voxels": False, "seed": 0}, modality="CT", gz=False)
def test_fuzzed_nifti_is_read_and_prepared_or_refused(header: dict[str, Any], modality: str, gz: bool) -> None:
    from duplus.data.image_io import read_image
    from duplus.data.preprocess import prepare_image

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("scan.nii.gz" if gz else "scan.nii")
        try:
            write_nifti(header, path)
        except Exception:  # noqa: BLE001 - a header nibabel itself cannot write is not an input we can test
            assume(False)
        try:
            image = read_image(path)
        except DuplusError as error:
            assert str(path) in str(error), f"the error does not name the file: {error}"
            return
        assert image.GetDimension() == 3
        assert all(math.isfinite(s) and s > 0 for s in image.GetSpacing()), image.GetSpacing()
        try:
            array, meta = prepare_image(image, modality, CONFIG)
        except DuplusError:
            return
        _check_prepared(array, meta)


@pytest.mark.parametrize("spacing", [[0.0, 1.0, 1.0], [math.nan, 1.0, 1.0], [math.inf, 1.0, 1.0]])
def test_unusable_voxel_size_is_refused_naming_the_file(spacing: list[float], tmp_path: Path) -> None:
    # ITK would read these as 1 mm voxels (the sform's 2 mm notwithstanding) with only a stderr warning.
    from duplus.data.image_io import read_image

    path = write_nifti({"shape": (5, 6, 7), "dtype": "int16", "spacing": [2.0, 1.0, 1.0], "direction": "identity",
                        "sform_code": 1, "qform_code": 1, "nan_voxels": False, "seed": 0}, tmp_path / "s.nii")
    # Patched into the bytes: nibabel's writer would swap a zero for 1 (pixdim starts at byte 76).
    with open(path, "r+b") as handle:
        handle.seek(76 + 4)
        handle.write(np.array(spacing[0], dtype="<f4").tobytes())
    with pytest.raises(DuplusError, match=r"s\.nii: the NIfTI header's voxel size \(pixdim\)"):
        read_image(path)


def test_negative_voxel_size_is_read_as_its_magnitude(tmp_path: Path) -> None:
    # The NIfTI reference library's convention (and ITK's): a sign in pixdim is a writer's slip.
    from duplus.data.image_io import read_image
    from duplus.data.preprocess import prepare_image

    path = write_nifti({"shape": (5, 6, 7), "dtype": "int16", "spacing": [-2.0, 1.0, 1.0], "direction": "identity",
                        "sform_code": 1, "qform_code": 1, "nan_voxels": False, "seed": 0}, tmp_path / "s.nii.gz")
    image = read_image(path)
    assert image.GetSpacing() == pytest.approx((2.0, 1.0, 1.0))
    array, meta = prepare_image(image, "CT", CONFIG)
    _check_prepared(array, meta)


@pytest.mark.parametrize("shape", [(6, 7), (5, 6, 7, 2)])
def test_wrong_dimension_is_refused_naming_the_file(shape: tuple[int, ...], tmp_path: Path) -> None:
    from duplus.data.image_io import read_image

    path = write_nifti({"shape": shape, "dtype": "float32", "spacing": [1.0, 1.0, 1.0], "direction": "identity",
                        "sform_code": 1, "qform_code": 1, "nan_voxels": False, "seed": 0}, tmp_path / "s.nii.gz")
    with pytest.raises(DuplusError, match="s.nii.gz"):
        read_image(path)


# --- EHR -----------------------------------------------------------------------------------------

CELLS = st.one_of(
    st.none(), st.just(math.nan), st.just(""), st.booleans(),
    st.integers(-5, 400), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["yes", "no", "M", "F", "1", "0", "1.0", "true", "unknown", " 7 ", "12.5", "-3", "inf", "NaN"]),
    st.text(max_size=6),
)
ID_CELLS = st.one_of(st.sampled_from(["p1", "p2", "p3", "007", "7", " p1", "P1"]), st.integers(0, 5), st.none(),
                     st.just(math.nan))


def ehr_schema():
    from duplus.prognosis.ehr import EHRSchema

    return EHRSchema(id="patient_id", time="rfs_months", event="relapse", numeric=("age",),
                     categorical=("site",), binary=("hpv",))


@st.composite
def ehr_frames(draw: st.DrawFn) -> pd.DataFrame:
    rows = draw(st.integers(0, 8))
    columns = ["patient_id", "rfs_months", "relapse", "age", "site", "hpv"]
    if draw(st.booleans()):
        columns = draw(st.lists(st.sampled_from(columns + ["extra"]), min_size=1, max_size=7, unique=True))
    data = {c: [draw(ID_CELLS if c == "patient_id" else CELLS) for _ in range(rows)] for c in columns}
    return pd.DataFrame(data, columns=columns)


def _check_valid(table: Any, rows: int) -> None:
    frame = table.frame
    ids = frame["patient_id"]
    assert len(frame) <= rows
    assert ids.map(lambda v: isinstance(v, str)).all() and ids.is_unique
    times = frame["rfs_months"].to_numpy(dtype=float)
    assert np.isfinite(times).all() and (times >= 0).all()
    assert set(frame["relapse"].tolist()) <= {0, 1}
    assert frame["age"].dtype.kind == "f" and not np.isinf(frame["age"]).any()
    assert set(frame["hpv"].dropna().tolist()) <= {0.0, 1.0}
    assert frame["site"].map(lambda v: v is None or isinstance(v, str)).all()
    assert len(table.ids) == len(table.time) == len(table.event) == len(frame)


@settings(max_examples=DEEP or 60, deadline=None, database=None)
@given(frame=ehr_frames(), match_images=st.booleans())
def test_fuzzed_ehr_table_is_validated_or_refused(frame: pd.DataFrame, match_images: bool) -> None:
    from duplus.prognosis.ehr import validate_ehr

    image_ids = ["p1", "p2", "p3", "007"] if match_images else None
    try:
        table = validate_ehr(frame, ehr_schema(), source="fuzz.csv", image_ids=image_ids, allow_unmatched=True)
    except EHRError as error:
        assert "fuzz.csv" in str(error)
        return
    _check_valid(table, len(frame))


@settings(max_examples=DEEP or 40, deadline=None, database=None)
@given(frame=ehr_frames(), junk=st.binary(max_size=40), mode=st.sampled_from(["csv", "csv+junk", "junk"]))
def test_fuzzed_ehr_file_is_loaded_or_refused(frame: pd.DataFrame, junk: bytes, mode: str) -> None:
    """The same through the CSV reader, plus files with garbage bytes."""
    from duplus.prognosis.ehr import load_ehr

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clinical.csv"
        text = frame.to_csv(index=False).encode() if mode != "junk" else b""
        path.write_bytes(text + (junk if mode != "csv" else b""))
        try:
            table = load_ehr(path, ehr_schema())
        except EHRError as error:
            assert str(path) in str(error)
            return
        _check_valid(table, len(pd.read_csv(path)))


@pytest.mark.parametrize("ids", [["p1", "p1"], ["p1", " p1"], ["7", "7.0"]])
def test_duplicate_ids_are_named(ids: list[str]) -> None:
    from duplus.prognosis.ehr import validate_ehr

    frame = pd.DataFrame({"patient_id": ids, "rfs_months": [1.0, 2.0], "relapse": [0, 1], "age": [50, 60],
                          "site": ["a", "b"], "hpv": [0, 1]})
    if ids == ["7", "7.0"]:
        validate_ehr(frame, ehr_schema())  # different text, different patients: ids stay text
        return
    with pytest.raises(EHRError, match="duplicate id"):
        validate_ehr(frame, ehr_schema())


# --- Headers found by a longer randomized campaign (NRRD/MHA/NIfTI writers with odd fields) --------

def _raw_nifti(path: Path, shape: tuple[int, ...], dtype: str, affine_rows: np.ndarray | None = None,
               intent: int = 0, scaling: tuple[float, float] | None = None) -> Path:
    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    if affine_rows is not None:
        for axis, row in zip("xyz", affine_rows):
            header[f"srow_{axis}"] = row
        header["sform_code"] = 2
    header["intent_code"] = intent
    image = nibabel.Nifti1Image(np.ones(shape, dtype=dtype), None, header=header)  # no affine: the header as set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nibabel.save(image, str(path))
    if scaling is not None:  # after saving: nibabel's writer resets scl_slope/scl_inter of an unscaled array
        with open(path, "r+b") as handle:
            handle.seek(112)
            handle.write(np.array(scaling, dtype="<f4").tobytes())
    return path


def _read_in_child(path: Path) -> str:
    """read_image in a child process: on the old code these files hung ITK's reader or aborted the process."""
    import subprocess
    import sys

    code = ("import sys\nfrom duplus.data.image_io import read_image\nfrom duplus.errors import DuplusError\n"
            "try:\n    read_image(sys.argv[1])\nexcept DuplusError as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0, done.stderr[-500:]
    return done.stdout


def test_sform_with_permuted_axes_and_infinite_offset_is_refused(tmp_path: Path) -> None:
    # ITK's ReadImageInformation never returned on this header.
    rows = np.array([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, np.inf], [0.0, 1.0, 0.0, 0.0]])
    path = _raw_nifti(tmp_path / "s.nii", (3, 3, 3), "uint8", affine_rows=rows)
    assert f"refused: {path}: the NIfTI header's sform" in _read_in_child(path)


def test_scaled_integer_vector_nifti_is_refused_not_a_crash(tmp_path: Path) -> None:
    # ITK corrupted its heap reading it (free(): invalid pointer, the process aborted).
    path = _raw_nifti(tmp_path / "s.nii", (4, 4, 4, 1, 2), "uint8", intent=1007, scaling=(0.5, 0.0))
    assert f"refused: {path}: NIfTI with 2 components per voxel" in _read_in_child(path)


@pytest.mark.parametrize("dtype", ["int16", "int8"])  # int8's vector pixel id lies below uint8's
def test_vector_nifti_of_one_component_is_read_as_a_scalar_volume(dtype: str, tmp_path: Path) -> None:
    # Intent "vector" without a fifth dimension: ITK gives a one-component vector image no resampler took.
    from duplus.data.image_io import read_image
    from duplus.data.preprocess import prepare_image

    path = _raw_nifti(tmp_path / "s.nii.gz", (5, 6, 7), dtype, intent=1007)
    image = read_image(path)
    image = _scalar_with_values(image)
    array, meta = prepare_image(image, "CT", CONFIG)
    _check_prepared(array, meta)


def _scalar_with_values(image: Any) -> Any:
    import SimpleITK as sitk

    assert image.GetNumberOfComponentsPerPixel() == 1 and image.GetPixelID() in (sitk.sitkInt16, sitk.sitkInt8)
    values = np.random.default_rng(0).integers(-900, 400, size=image.GetSize()[::-1]).astype(np.int16)
    result = sitk.GetImageFromArray(values)
    result.CopyInformation(image)
    return result


def test_four_d_vector_image_is_refused_naming_the_file(tmp_path: Path) -> None:
    from duplus.data.image_io import read_image

    path = _raw_nifti(tmp_path / "s.nii", (1, 13, 1, 2), "float32", intent=1007)
    with pytest.raises(DuplusError, match=r"s\.nii: cannot take one 3-D volume"):
        read_image(path, channel=0)
    with pytest.raises(DuplusError, match=r"s\.nii"):
        read_image(path)


@pytest.mark.parametrize("modality", ["MRI", "PET"])
def test_float32_extreme_intensities_give_a_finite_volume(modality: str) -> None:
    # The z-score in float32 overflowed (max - (-max) = inf) and the whole volume became NaN.
    import SimpleITK as sitk

    from duplus.data.preprocess import prepare_image

    top = np.finfo(np.float32).max
    values = np.random.default_rng(0).choice([-top, -top / 3, top / 3, top], size=(6, 7, 8)).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((4.0, 4.0, 4.0))  # the target spacing: no resampling, the extremes reach the statistics
    array, meta = prepare_image(image, modality, CONFIG)
    _check_prepared(array, meta)


@pytest.mark.parametrize("spacing", [(1e4, 1.0, 1e4), (1.0, 1e30, 1.0)])
def test_a_grid_spanning_metres_is_refused(spacing: tuple[float, float, float]) -> None:
    # 3 x 8 x 8 voxels of 1e4 mm asked for a 2.6e8-voxel grid (MemoryError, minutes); 1e30 mm wrapped int().
    import SimpleITK as sitk

    from duplus.data.geometry import target_grid
    from duplus.errors import DataError

    image = sitk.Image([3, 8, 8], sitk.sitkInt16)
    image.SetSpacing(spacing)
    with pytest.raises(DataError, match="check the header's spacing"):
        target_grid(image, [4.0, 4.0, 4.0])

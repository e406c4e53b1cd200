"""Property tests: spelling variants of every synonym resolve, and same-spacing round trips are lossless."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duplus.data import taxonomy
from duplus.data.preprocess import settings as preprocess_settings
from duplus.data.preprocess import transform_case
from duplus.data.restore import restore_to_original

SYNONYMS = [(text, info.name) for info in taxonomy.all_classes() for text in (info.name, *info.synonyms)]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sampled_from(SYNONYMS), st.sampled_from(["", " ", "  "]), st.sampled_from([" ", "_", "-", "  "]),
       st.booleans(), st.sampled_from(["", ".", "s"]))
def test_spelling_variants_resolve(pair: tuple[str, str], pad: str, separator: str, upper: bool, tail: str) -> None:
    text, canonical = pair
    if tail == "s" and not text.endswith(("tumor", "tumour")):
        tail = ""  # only tumour plurals are normalised
    variant = separator.join(text.split()) + tail
    variant = pad + (variant.upper() if upper else variant.title()) + pad
    assert taxonomy.canonical_name(variant) == canonical


ORIENTATIONS = [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (1, 0, 0, 0, 1, 0, 0, 0, -1),
                (0, 1, 0, 1, 0, 0, 0, 0, 1), (0, 0, 1, 1, 0, 0, 0, 1, 0)]


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(*(st.integers(6, 14) for _ in range(3))), st.tuples(*(st.sampled_from([0.7, 1.0, 2.5])
                                                                      for _ in range(3))),
       st.sampled_from(ORIENTATIONS), st.integers(0, 2**16), st.sampled_from(["CT", "MRI", "PET"]))
def test_same_spacing_round_trip_is_exact(size: tuple[int, int, int], spacing: tuple[float, float, float],
                                          direction: tuple[int, ...], seed: int, modality: str) -> None:
    rng = np.random.default_rng(seed)
    shape = size[::-1]
    values = rng.normal(100.0, 30.0, shape).astype(np.float32)
    labels = rng.integers(0, 4, shape).astype(np.uint8)
    image, label = sitk.GetImageFromArray(values), sitk.GetImageFromArray(labels)
    for volume in (image, label):
        volume.SetSpacing(spacing)
        volume.SetDirection([float(d) for d in direction])
        volume.SetOrigin((12.5, -40.0, 7.0))
    lps_spacing = sitk.DICOMOrient(image, "LPS").GetSpacing()
    options = preprocess_settings({"preprocess": {"spacing": list(lps_spacing)}})
    _, label_array, meta = transform_case(image, label, modality, options, crop=True)
    restored = restore_to_original(label_array, meta, is_label=True)
    assert restored.GetSize() == label.GetSize() and restored.GetDirection() == label.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(restored), labels)

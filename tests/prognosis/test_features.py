"""Image features from a (fake) DuPLUS model: pooled values, masks, padding, per-case cache."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from duplus.errors import DataError
from duplus.prognosis.features import CaseInput, FeatureSettings, case_features, extract_features, padded_shape, size_divisor

from .fakes import FakeDuPLUS

CTX, TARGETS = torch.zeros(8), torch.zeros(2, 8)


def block_image() -> np.ndarray:
    image = np.zeros((8, 8, 8), dtype=np.float32)
    image[:4, :4, :4] = 1.0              # exactly one bottleneck cell is "tumour"
    return image


def test_predicted_tumour_features_are_exact():
    settings = FeatureSettings(voxel_ml=0.064)
    vector, volume = case_features(FakeDuPLUS(), block_image(), 2, CTX, TARGETS, settings)
    scale = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(vector[:3], scale / 8, rtol=1e-6)        # GAP over 8 cells, one of value c+1
    np.testing.assert_allclose(vector[3:6], scale, rtol=1e-6)           # mean inside the tumour
    assert volume == pytest.approx(64 * 0.064)
    assert vector[6] == pytest.approx(math.log1p(64 * 0.064))


def test_label_mask_is_the_config_alternative():
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[4:, 4:, 4:] = 2                # lymph node where the image is 0
    label[4:6, :2, :2] = 1
    model = FakeDuPLUS()
    vector, volume = case_features(model, block_image(), 2, CTX, TARGETS,
                                   FeatureSettings(mask_source="label", tumour_labels=(2,)), label=label)
    np.testing.assert_allclose(vector[3:6], 0.0, atol=1e-7)
    assert volume == pytest.approx(64e-3) and model.forward_calls == 0  # no prediction needed
    _, both = case_features(model, block_image(), 2, CTX, TARGETS, FeatureSettings(mask_source="label"), label=label)
    assert both == pytest.approx(72e-3)
    with pytest.raises(DataError, match="needs the case's label"):
        case_features(model, block_image(), 2, CTX, TARGETS, FeatureSettings(mask_source="label"))


def test_empty_tumour_falls_back_to_gap_and_padding_keeps_gap():
    image = np.full((6, 7, 5), 0.25, dtype=np.float32)
    image[0, 0, 0] = 0.0                 # background value used for padding
    vector, volume = case_features(FakeDuPLUS(1), image, 0, CTX, TARGETS, FeatureSettings(patch_size=(8, 12, 4)))
    assert volume == 0.0 and vector[1] == vector[0] and vector[2] == 0.0
    # Cells count by the fraction of them that is image: less dilution than a plain mean over the
    # padded grid (0.25 * 210 / 768), never above the image's own value.
    assert 0.25 * 210 / 768 < vector[0] < 0.25
    assert padded_shape((6, 7, 5), 4, (8, 12, 4)) == (8, 12, 8)
    assert padded_shape((33, 1, 16), 16, None) == (48, 16, 16)


def test_size_divisor_is_read_off_the_model():
    assert size_divisor(FakeDuPLUS()) == 4
    assert size_divisor(SimpleNamespace(cfg=SimpleNamespace(channels=(32, 64, 128, 256, 320)))) == 16
    assert size_divisor(object()) == 32


def make_cases(root: Path, n: int = 3) -> list[CaseInput]:
    cases = []
    for i in range(n):
        folder = root / f"case{i}"
        folder.mkdir(parents=True)
        image = block_image() * (i + 1)
        np.save(folder / "image.npy", image)
        np.save(folder / "label.npy", (image > 0).astype(np.uint8))
        cases.append(CaseInput(f"case{i}", folder / "image.npy", folder / "label.npy", 2, CTX, TARGETS))
    return cases


def test_cache_is_keyed_by_model_and_recomputed_when_stale(tmp_path):
    cases = make_cases(tmp_path / "store")
    model, settings, out = FakeDuPLUS(), FeatureSettings(), tmp_path / "out"
    first = extract_features(model, cases, out, "sha-A", settings)
    assert model.encode_calls == 3 and sorted(first) == ["case0", "case1", "case2"]
    sidecar = json.loads((out / "features" / "case1.json").read_text(encoding="utf-8"))
    assert sidecar["data"]["model_sha256"] == "sha-A"
    np.testing.assert_array_equal(np.load(out / "features" / "case1.npy"), first["case1"])

    again = extract_features(model, cases, out, "sha-A", settings)
    assert model.encode_calls == 3                                   # all from the cache
    np.testing.assert_array_equal(again["case2"], first["case2"])

    extract_features(model, cases, out, "sha-B", settings)           # another model: recompute all
    assert model.encode_calls == 6
    (out / "features" / "case0.json").write_text("{trunc")            # damaged sidecar: recompute it
    np.save(cases[2].image_path, block_image() * 7)                  # changed image: recompute it
    extract_features(model, cases, out, "sha-B", settings)
    assert model.encode_calls == 8


def test_an_array_a_killed_run_replaced_is_not_taken_for_its_old_record(tmp_path):
    """Run A caches case0; run B (another model) is killed between writing case0's array and its
    record; a rerun of A must not take B's array under A's record."""
    cases = make_cases(tmp_path / "store", 1)
    model, settings, out = FakeDuPLUS(), FeatureSettings(), tmp_path / "out"
    first = extract_features(model, cases, out, "sha-A", settings)["case0"]
    np.save(out / "features" / "case0.npy", first + 1.0)  # what run B wrote before it was killed
    again = extract_features(model, cases, out, "sha-A", settings)["case0"]
    assert model.encode_calls == 2
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(np.load(out / "features" / "case0.npy"), first)


def test_a_results_folder_given_relative_to_the_working_directory_is_cached(tmp_path, monkeypatch):
    """The pipeline passes ``results/prognosis`` (relative, as Snakemake runs in the project): the cache's
    record must name its array relative to the cache folder, not the working directory."""
    cases = make_cases(tmp_path / "store", 2)
    monkeypatch.chdir(tmp_path)
    model, settings = FakeDuPLUS(), FeatureSettings()
    first = extract_features(model, cases, Path("results/prognosis"), "sha-A", settings, subfolder="ds")
    again = extract_features(model, cases, Path("results/prognosis"), "sha-A", settings, subfolder="ds")
    assert model.encode_calls == 2  # the second run read both from the cache
    np.testing.assert_array_equal(again["case1"], first["case1"])


def test_missing_image_names_the_case(tmp_path):
    cases = make_cases(tmp_path / "store", 1)
    cases[0].image_path.unlink()
    with pytest.raises(DataError, match="case case0: image file .* does not exist"):
        extract_features(FakeDuPLUS(), cases, tmp_path / "out", "sha", FeatureSettings())

"""Dice, hd95 and NSD on masks with known answers, including anisotropic spacing and empty masks."""

import math

import numpy as np
import pytest

from duplus.errors import DataError
from duplus.evaluate.metrics import case_metrics


def _cube(shape=(20, 24, 28), lo=(5, 6, 7), size=(8, 8, 8)):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, a + s) for a, s in zip(lo, size))] = True
    return mask


def test_dice_exact_values():
    truth = _cube()
    half = truth.copy()
    half[:, :, 11:] = False  # keeps 4 of 8 columns along X: dice = 2*256 / (256+512)
    rows = case_metrics(np.stack([truth, half]), np.stack([truth, truth]), (1.0, 1.0, 1.0), ["same", "half"], 1.0)
    assert rows[0] == {"class": "same", "dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    assert rows[1]["dice"] == pytest.approx(2 / 3, abs=1e-6)


@pytest.mark.parametrize("axis,expected_mm", [(0, 3 * 2.5), (1, 3 * 0.8), (2, 3 * 1.5)])
def test_hd95_of_a_shifted_cube_is_in_mm(axis, expected_mm):
    spacing = (2.5, 0.8, 1.5)  # per array axis (Z, Y, X)
    truth = _cube()
    shifted = np.roll(truth, 3, axis=axis)
    rows = case_metrics(shifted[None], truth[None], spacing, ["cube"], nsd_tolerance_mm=expected_mm + 0.01)
    assert rows[0]["hd95"] == pytest.approx(expected_mm, rel=1e-5)
    assert rows[0]["dice"] == pytest.approx(5 / 8, abs=1e-6)
    assert rows[0]["nsd"] == pytest.approx(1.0)
    tight = case_metrics(shifted[None], truth[None], spacing, ["cube"], nsd_tolerance_mm=expected_mm / 4)
    assert tight[0]["nsd"] < 1.0


def test_mask_touching_the_border():
    truth = np.zeros((6, 6, 6), bool)
    truth[:3] = True
    pred = np.zeros_like(truth)
    pred[:4] = True
    rows = case_metrics(pred[None], truth[None], (2.0, 1.0, 1.0), ["slab"], 1.0)
    assert rows[0]["hd95"] == pytest.approx(2.0)


def test_empty_mask_conventions():
    empty, cube = np.zeros((10, 10, 10), bool), _cube((10, 10, 10), (2, 2, 2), (4, 4, 4))
    rows = case_metrics(np.stack([empty, empty, cube]), np.stack([empty, cube, empty]), (1, 1, 1),
                        ["none", "missed", "spurious"], 2.0)
    assert rows[0] == {"class": "none", "dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    assert rows[1]["dice"] == 0.0 and math.isnan(rows[1]["hd95"]) and rows[1]["nsd"] == 0.0
    assert rows[2]["dice"] == 0.0 and math.isnan(rows[2]["hd95"]) and rows[2]["nsd"] == 0.0


def test_shape_mismatch_is_named():
    with pytest.raises(DataError, match="differ in shape"):
        case_metrics(np.zeros((1, 4, 4, 4), bool), np.zeros((1, 4, 4, 5), bool), (1, 1, 1))


def test_default_nsd_tolerance_is_the_schemas():
    from pathlib import Path

    import yaml

    from duplus.evaluate.definitions import DEFAULT_NSD_TOLERANCE_MM

    schema = yaml.safe_load((Path(__file__).parents[2] / "schemas/config.schema.yaml").read_text(encoding="utf-8"))
    assert schema["properties"]["evaluate"]["properties"]["nsd_tolerance_mm"]["default"] == DEFAULT_NSD_TOLERANCE_MM

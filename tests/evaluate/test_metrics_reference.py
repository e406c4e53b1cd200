"""HD95 and NSD against DeepMind's surface-distance (the reference implementation of both), to 1e-4.

The mask pairs cover what real evaluations meet: anisotropic CT spacing (0.8 x 0.8 x 3 mm),
shifted and nested shapes, masks touching the volume border, single voxels. Where the reference has
no number for empty masks (inf, NaN) the pipeline's own convention is stated instead.
"""

import math

import numpy as np
import pytest
import surface_distance
from scipy import ndimage

from duplus.evaluate.metrics import class_metrics

CT = (3.0, 0.8, 0.8)  # mm per array axis (Z, Y, X): thick slices, fine in-plane
ISO = (1.0, 1.0, 1.0)
TOLERANCE_MM = 2.0

# The reference reaches scipy.ndimage through namespaces SciPy deprecates; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:surface_distance.*")


def _ball(shape, center, radius_mm, spacing):
    grid = np.indices(shape, dtype=float)
    return sum(((grid[i] - center[i]) * spacing[i]) ** 2 for i in range(3)) <= radius_mm ** 2


def _box(shape, lo, hi):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def _voxel(shape, at):
    mask = np.zeros(shape, bool)
    mask[at] = True
    return mask


def _blobs(shape, seed, fraction):
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    return noise > np.quantile(noise, 1 - fraction)


S = (16, 48, 48)
PAIRS = {
    # name: (prediction, truth, spacing)
    "balls 6 mm apart along Z, CT spacing": (_ball(S, (10, 24, 24), 10, CT), _ball(S, (8, 24, 24), 10, CT), CT),
    "balls 6 mm apart in-plane, CT spacing": (_ball(S, (8, 24, 31.5), 10, CT), _ball(S, (8, 24, 24), 10, CT), CT),
    "offset balls, 1 mm": (_ball((40,) * 3, (21.3, 19.4, 20.7), 12, ISO), _ball((40,) * 3, (20, 20, 20), 10, ISO), ISO),
    "single voxel shifted one slice, CT spacing": (_voxel(S, (9, 24, 24)), _voxel(S, (8, 24, 24)), CT),
    "single voxel shifted in-plane, CT spacing": (_voxel(S, (8, 24, 25)), _voxel(S, (8, 24, 24)), CT),
    "single voxel inside a box": (_voxel(S, (8, 20, 20)), _box(S, (6, 16, 16), (11, 26, 26)), CT),
    "nested boxes": (_box(S, (5, 14, 14), (11, 34, 34)), _box(S, (6, 16, 16), (10, 30, 30)), CT),
    "nested balls, prediction inside": (_ball(S, (8, 24, 24), 11, CT), _ball(S, (8, 24, 24), 13, CT), CT),
    "slabs touching the border": (_box(S, (0, 0, 0), (5, 48, 48)), _box(S, (0, 0, 0), (3, 48, 48)), CT),
    "whole volume against a corner box": (np.ones((8, 12, 12), bool), _box((8, 12, 12), (0, 0, 0), (4, 6, 6)), CT),
    "box cut by the border, shifted": (_box(S, (10, 30, 30), (16, 48, 48)), _box(S, (12, 33, 28), (16, 48, 48)), CT),
    "two components against one": (_box(S, (4, 8, 8), (8, 16, 16)) | _box(S, (9, 30, 30), (13, 40, 40)),
                                   _box(S, (4, 9, 8), (9, 17, 17)), CT),
    "random blobs, CT spacing": (_blobs(S, 1, 0.2), _blobs(S, 2, 0.25), CT),
    "random blobs, mixed spacing": (_blobs((20, 20, 20), 3, 0.3), _blobs((20, 20, 20), 4, 0.3), (1.5, 0.5, 1.0)),
}


def _reference(pred, truth, spacing):
    distances = surface_distance.compute_surface_distances(truth, pred, spacing)
    return (surface_distance.compute_robust_hausdorff(distances, 95),
            surface_distance.compute_surface_dice_at_tolerance(distances, TOLERANCE_MM))


@pytest.mark.parametrize("name", PAIRS)
def test_hd95_and_nsd_match_the_reference(name):
    pred, truth, spacing = PAIRS[name]
    ours = class_metrics(pred, truth, spacing, TOLERANCE_MM)
    hd95, nsd = _reference(pred, truth, spacing)
    assert ours["hd95"] == pytest.approx(hd95, abs=1e-4)
    assert ours["nsd"] == pytest.approx(nsd, abs=1e-4)


@pytest.fixture
def reference_on_numpy2(monkeypatch):
    # surface-distance 0.1 (the release on PyPI) still spells np.Inf / np.NaN, which NumPy 2 removed;
    # the upstream fix renamed only those. Only its empty-mask branches use them.
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)
    monkeypatch.setattr(np, "NaN", np.nan, raising=False)


@pytest.mark.usefixtures("reference_on_numpy2")
def test_empty_masks_where_the_conventions_differ():
    empty, box = np.zeros(S, bool), _box(S, (6, 16, 16), (11, 26, 26))
    # Both empty: the reference has no surface (HD95 inf, NSD 0/0 = NaN); the pipeline counts a
    # structure rightly left out as perfect, as BraTS does: Dice 1, HD95 0 mm, NSD 1.
    with np.errstate(invalid="ignore", divide="ignore"):
        hd95, nsd = _reference(empty, empty, CT)
    assert math.isinf(hd95) and math.isnan(nsd)
    assert class_metrics(empty, empty, CT, TOLERANCE_MM) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    # One empty: the reference's NSD is 0, as ours; its HD95 is inf, ours NaN (no distance to
    # nothing: averaged with nanmean, counted apart as "HD95 cases").
    for pred, truth in ((empty, box), (box, empty)):
        hd95, nsd = _reference(pred, truth, CT)
        ours = class_metrics(pred, truth, CT, TOLERANCE_MM)
        assert math.isinf(hd95) and nsd == 0.0
        assert ours["dice"] == 0.0 and ours["nsd"] == nsd and math.isnan(ours["hd95"])

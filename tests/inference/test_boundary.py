"""Boundary probabilities: kept slab by slab exactly where interpolation needs them, within a budget."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from duplus.data.restore import restore_levels, restore_to_original
from duplus.inference.boundary import BoundaryCollector, boundary, dilate, to_levels
from duplus.inference.packed import PackedMasks
from duplus.inference.predict import predict_masks, predict_probabilities
from duplus.model import DuPLUS, ModelConfig


def _smooth_probabilities(classes: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((classes, 1, *shape), generator=generator)
    kernel = torch.ones(1, 1, 5, 5, 5) / 125
    smooth = torch.nn.functional.conv3d(noise, kernel, padding=2)[:, 0]
    return torch.sigmoid(6 * smooth / smooth.std())


def _reference_levels(probabilities: torch.Tensor, cut: float) -> np.ndarray:
    """What the collector must produce: whole-volume boundary levels, 255 / 0 elsewhere."""
    inside = probabilities > cut
    band = boundary(inside).numpy()
    return np.where(band, to_levels(probabilities, cut).numpy(), np.where(inside.numpy(), 255, 0)).astype(np.uint8)


def test_dilate_is_a_3x3x3_box():
    mask = torch.zeros(5, 6, 7, dtype=torch.bool)
    mask[2, 3, 3] = True
    grown = dilate(mask)
    assert int(grown.sum()) == 27 and bool(grown[1:4, 2:5, 2:5].all())
    assert not bool(boundary(torch.ones(4, 4, 4, dtype=torch.bool)).any())


def test_levels_keep_each_voxel_on_its_side_of_the_threshold():
    p = torch.tensor([0.0, 0.49, 0.5, 0.5001, 0.502, 1.0])
    levels = to_levels(p, 0.5)
    assert levels.tolist() == [0, 125, 127, 128, 128, 255]
    masks = PackedMasks(1, (1, 1, 1), cut=0.5)
    assert masks.level_cut == 127.5
    assert ((levels.float() > masks.level_cut) == (p > 0.5)).all()


@pytest.mark.parametrize("slab_depths", [[7, 7, 7, 7, 2], [1] * 30, [30], [3, 11, 1, 15]])
def test_slabs_in_any_sizes_keep_the_whole_volume_boundary(slab_depths):
    probs = _smooth_probabilities(3, (30, 18, 21))
    masks = PackedMasks(3, (30, 18, 21), cut=0.5, level_budget_bytes=2**30)
    collector = BoundaryCollector(masks)
    z0 = 0
    for depth in slab_depths:
        slab = probs[:, z0 : z0 + depth]
        masks.write(z0, (slab > 0.5).numpy())
        collector.add(z0, slab)
        z0 += depth
    for k in range(3):
        np.testing.assert_array_equal(masks.levels(k), _reference_levels(probs[k], 0.5))
    with pytest.raises(ValueError, match="expected 0"):
        BoundaryCollector(masks).add(7, probs[:, 7:9])


@pytest.mark.parametrize("slab_depths", [[5, 5, 8], [1] * 18])
def test_slabs_along_y_keep_the_whole_volume_boundary(slab_depths):
    """Slabs of y rows [K, dy, Z, X] (the ring runs along y when that is smaller): the same levels, at the
    grid's own indices."""
    probs = _smooth_probabilities(2, (30, 18, 21), seed=3)
    masks = PackedMasks(2, (30, 18, 21), cut=0.5, level_budget_bytes=2**30)
    collector = BoundaryCollector(masks, axis=1)
    y0 = 0
    for depth in slab_depths:
        slab = probs[:, :, y0 : y0 + depth].transpose(1, 2)
        masks.write(y0, (slab > 0.5).numpy(), axis=1)
        collector.add(y0, slab)
        y0 += depth
    np.testing.assert_array_equal(np.asarray(masks), (probs > 0.5).numpy())
    for k in range(2):
        np.testing.assert_array_equal(masks.levels(k), _reference_levels(probs[k], 0.5))


def test_a_class_past_the_budget_keeps_its_mask_only():
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (12, 16, 16)], indexing="ij")
    ball = torch.sigmoid(3.0 - ((z - 6) ** 2 + (y - 8) ** 2 + (x - 8) ** 2).sqrt())  # a small shell
    noisy = 0.5 + 0.01 * torch.sign(_smooth_probabilities(1, (12, 16, 16))[0] - 0.5)  # boundary almost everywhere
    probs = torch.stack([ball, noisy])
    masks = PackedMasks(2, (12, 16, 16), cut=0.5, level_budget_bytes=2000)
    masks.write(0, (probs > 0.5).numpy())
    BoundaryCollector(masks).add(0, probs)
    assert masks.mask_only == {1} and masks.has_levels(0)
    with pytest.raises(ValueError, match="class 1 kept its mask only"):
        masks.levels(1)
    assert masks.nbytes <= masks._bits.nbytes + 2000


def _oblique_meta(shape: tuple[int, int, int], cropped: bool = True) -> dict:
    """A preprocessed grid inside an oblique original one; ``cropped``: the case is a box of the grid."""
    angle = 0.3
    direction = [np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1]
    z, y, x = shape
    box = [[2, 2 + z], [3, 3 + y], [1, 1 + x]] if cropped else [[0, z], [0, y], [0, x]]
    grid = [x + 4, y + 6, z + 5] if cropped else [x, y, z]
    return {"crop_box": box,
            "resampled": {"size": grid, "spacing": [1.5, 1.5, 1.5], "origin": [-10.0, 5.0, 3.0],
                          "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]},
            "original": {"size": [90, 100, 40], "spacing": [0.7, 0.6, 1.2], "origin": [-20.0, -5.0, 0.0],
                         "direction": direction}}


def test_restore_levels_equals_interpolating_the_whole_map_on_an_oblique_grid():
    probs = _smooth_probabilities(3, (20, 24, 22), seed=3)
    meta = _oblique_meta((20, 24, 22))
    for k in range(3):
        levels = _reference_levels(probs[k], 0.5)
        fast = restore_levels(levels, meta, 127.5)
        whole = restore_to_original(levels.astype(np.float32), meta, is_label=False)
        assert fast.GetSize() == whole.GetSize() == (90, 100, 40)
        assert fast.GetDirection() == whole.GetDirection() and fast.GetOrigin() == whole.GetOrigin()
        expected = sitk.GetArrayFromImage(whole) > 127.5
        np.testing.assert_array_equal(sitk.GetArrayFromImage(fast).astype(bool), expected)
        assert expected.any()
    empty = restore_levels(np.zeros((20, 24, 22), np.uint8), meta, 127.5)
    assert not sitk.GetArrayFromImage(empty).any() and empty.GetSpacing() == (0.7, 0.6, 1.2)


def test_interpolated_boundaries_beat_copied_voxels_on_a_small_organ():
    """An ellipsoid on a 0.75 mm grid predicted perfectly at 1.5 mm (probability = covered fraction)."""
    fine = np.stack(np.meshgrid(*[(np.arange(64) + 0.5) * 0.75] * 3, indexing="ij"))
    organ = (((fine - 24.0) / np.array([5.0, 8.0, 4.0])[:, None, None, None]) ** 2).sum(0) <= 1
    probs = torch.from_numpy(organ.reshape(32, 2, 32, 2, 32, 2).mean((1, 3, 5))).float()[None]
    grid = {"size": [32, 32, 32], "spacing": [1.5] * 3, "origin": [0.375] * 3, "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    meta = {"crop_box": [[0, 32]] * 3, "resampled": grid,
            "original": {"size": [64] * 3, "spacing": [0.75] * 3, "origin": [0.0] * 3, "direction": grid["direction"]}}
    masks = PackedMasks(1, (32, 32, 32), cut=0.5, level_budget_bytes=2**20)
    masks.write(0, (probs > 0.5).numpy())
    BoundaryCollector(masks).add(0, probs)
    # A thin shell, not the volume: under a tenth of a byte per voxel beside the packed mask.
    assert masks.nbytes - 32 * 32 * 4 < 0.1 * probs.numel()

    def dice(image: sitk.Image) -> float:
        pred = sitk.GetArrayFromImage(image).astype(bool)
        return 2 * float((pred & organ).sum()) / float(pred.sum() + organ.sum())

    copied = dice(restore_to_original(masks[0].astype(np.uint8), meta, is_label=True))
    interpolated = dice(masks.restored(0, meta))
    assert copied < 0.91 and interpolated > 0.96


def test_predicted_masks_restore_like_their_whole_probability_map():
    torch.manual_seed(0)
    model = DuPLUS(ModelConfig.preset("tiny", text_dim=12)).eval()
    config = {"pretrain": {"patch_size": [16, 16, 16]},
              "inference": {"overlap": 0.5, "sw_batch_size": 2, "blend": "gaussian", "threshold": 0.5}}
    image, ctx, targets = torch.randn(20, 24, 22), torch.randn(12), torch.randn(2, 12)
    # Blended in the 16-bit buffer the masks use (any float32 buffer is over this budget).
    fixed = {**config, "inference": {**config["inference"], "blend_buffer_mb": 1e-6}}
    probs = predict_probabilities(model, image, "CT", ctx, targets, fixed, show_progress=False)
    cut = float(probs.median())
    masks = predict_masks(model, image, "CT", ctx, targets, config, threshold=cut, show_progress=False)
    # Uncropped, as a scan to segment or a test case is: a crop's faces border zeros that are no prediction.
    meta = _oblique_meta((20, 24, 22), cropped=False)
    for k in range(2):
        assert masks.has_levels(k)
        whole = restore_to_original(to_levels(probs[k], cut).numpy().astype(np.float32), meta, is_label=False)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(masks.restored(k, meta)).astype(bool),
                                      sitk.GetArrayFromImage(whole) > masks.level_cut)
    config["inference"]["boundary_budget_mb"] = 0
    plain = predict_masks(model, image, "CT", ctx, targets, config, threshold=cut, show_progress=False)
    assert plain.mask_only == {0, 1}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(plain.restored(0, meta)),
                                  sitk.GetArrayFromImage(restore_to_original(plain[0].astype(np.uint8), meta, True)))

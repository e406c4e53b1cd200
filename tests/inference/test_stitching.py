"""Streaming slab blending: same result as MONAI's whole-volume blending, in order, without the whole buffer."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from duplus.inference.packed import PackedMasks
from duplus.inference.predict import predict_masks, predict_probabilities
from duplus.inference.stitching import FIXED, blend_slabs, count_windows, fixed_scale, max_cover, window_starts
from duplus.model import DuPLUS, ModelConfig

CPU = torch.device("cpu")


def _predictor(classes: int):
    """A deterministic, position-dependent function of each window (a fixed random conv)."""
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(1, classes, 3, padding=1)

    def predict(windows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(conv(windows))

    return predict


def _blend(volume, predictor, classes, roi, overlap, mode, batch=3):
    out = torch.full((classes, *volume.shape), float("nan"))
    order = []
    for z0, slab in blend_slabs(volume, predictor, classes, roi=roi, overlap=overlap, sw_batch_size=batch,
                                mode=mode, device=CPU, stitch_device=CPU):
        order.append((z0, slab.shape[1]))
        out[:, z0 : z0 + slab.shape[1]] = slab
    return out, order


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("shape", [(37, 21, 26), (16, 40, 16), (50, 16, 19)])
def test_equals_monai_sliding_window_inference(mode, overlap, shape):
    volume = torch.randn(shape)
    predictor = _predictor(3)
    ours, order = _blend(volume, predictor, 3, (16, 16, 16), overlap, mode)
    theirs = sliding_window_inference(volume[None, None], (16, 16, 16), 3, predictor, overlap=overlap, mode=mode)[0]
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    # Consecutive slabs, in order, covering every slice exactly once.
    assert [z for z, _ in order] == list(np.cumsum([0] + [n for _, n in order])[:-1])
    assert sum(n for _, n in order) == shape[0]


def test_volume_smaller_than_the_window_is_padded_and_cropped_back():
    """Padded with the volume's minimum, as training pads its patches (zero would be mid-body tissue)."""
    volume = torch.randn(5, 9, 16) + 3.0
    ours, _ = _blend(volume, _predictor(2), 2, (8, 16, 16), 0.5, "gaussian")
    padded = torch.nn.functional.pad(volume, (0, 0, 0, 7, 0, 3), value=float(volume.min()))
    direct = _predictor(2)(padded[None, None])[0, :, :5, :9]
    assert torch.allclose(ours, direct, atol=1e-6)
    zero_padded = _predictor(2)(torch.nn.functional.pad(volume, (0, 0, 0, 7, 0, 3))[None, None])[0, :, :5, :9]
    assert not torch.allclose(ours, zero_padded, atol=1e-3)


def test_slabs_leave_before_the_last_window_runs():
    """The first slab is handed over while later z-rows are still to come: memory is one window deep."""
    events = []
    predictor = _predictor(1)

    def counting(windows):
        events.append("window")
        return predictor(windows)

    volume = torch.randn(64, 16, 16)
    for _, slab in blend_slabs(volume, counting, 1, roi=(16, 16, 16), overlap=0.5, sw_batch_size=1,
                               mode="gaussian", device=CPU, stitch_device=CPU):
        events.append("slab")
        assert slab.shape[1] <= 16
    assert events.index("slab") < len(events) - 1 - events[::-1].index("window")
    assert events.count("window") == count_windows(volume.shape, (16, 16, 16), 0.5) == 7


def test_window_starts_reach_the_far_end():
    assert window_starts(37, 16, 0.5) == [0, 8, 16, 21]
    assert window_starts(10, 16, 0.5) == [0]
    assert window_starts(32, 16, 0.0) == [0, 16]


def test_masks_equal_thresholded_probabilities():
    torch.manual_seed(0)
    model = DuPLUS(ModelConfig.preset("tiny", text_dim=12)).eval()
    config = {"pretrain": {"patch_size": [16, 16, 16]},
              "inference": {"overlap": 0.5, "sw_batch_size": 2, "blend": "gaussian", "threshold": 0.5}}
    image, ctx, targets = torch.randn(30, 20, 17), torch.randn(12), torch.randn(3, 12)
    # The masks blend in 16-bit fixed point; probabilities do too once a float32 buffer is over budget.
    fixed = {**config, "inference": {**config["inference"], "blend_buffer_mb": 1e-6}}
    probs = predict_probabilities(model, image, "CT", ctx, targets, fixed, show_progress=False)
    cut = float(probs.median())  # a threshold that splits the (untrained) output in half
    masks = predict_masks(model, image, "CT", ctx, targets, config, threshold=cut, show_progress=False)
    assert isinstance(masks, PackedMasks) and masks.shape == (3, 30, 20, 17)
    full = np.asarray(masks)
    np.testing.assert_array_equal(full, (probs > cut).numpy())
    assert 0 < full.sum() < full.size
    # Against the float32 blend (MONAI's numbers): only voxels within the fixed point's error of the cut differ.
    exact = predict_probabilities(model, image, "CT", ctx, targets, config, show_progress=False)
    assert float((probs - exact).abs().max()) <= max_cover(image.shape, (16, 16, 16), 0.5) / 2 / fixed_scale(8) + 1e-6
    changed = full != (exact > cut).numpy()
    assert not changed[(exact - cut).abs().numpy() > 2e-4].any()


def test_packed_masks_round_trip_any_width():
    rng = np.random.default_rng(0)
    full = rng.random((3, 7, 5, 13)) > 0.6  # x = 13: not a multiple of 8
    masks = PackedMasks(3, (7, 5, 13))
    masks.write(0, full[:, :4])
    masks.write(4, full[:, 4:])
    assert len(masks) == 3 and masks.shape == full.shape and masks.nbytes == 3 * 7 * 5 * 2
    for k in range(3):
        np.testing.assert_array_equal(masks[k], full[k])
    np.testing.assert_array_equal(np.asarray(masks), full)
    with pytest.raises(ValueError, match="does not fit"):
        masks.write(0, full[:2])


@pytest.mark.parametrize("dense_bytes", [0, 2**30])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_fixed_point_buffer_stays_within_half_a_unit_per_window(overlap, dense_bytes):
    """The 16-bit sums against MONAI's float32 blend, in blocks (0 bytes allowed dense) and in a dense ring:
    within their stated bound, whatever the overlap."""
    volume = torch.randn(40, 37, 21)
    roi = (16, 16, 16)
    predictor = _predictor(3)
    out = torch.full((3, *volume.shape), float("nan"))
    for z0, slab in blend_slabs(volume, predictor, 3, roi=roi, overlap=overlap, sw_batch_size=2, mode="gaussian",
                                device=CPU, stitch_device=CPU, buffer_dtype=FIXED, dense_fixed_bytes=dense_bytes):
        out[:, z0 : z0 + slab.shape[1]] = slab
    theirs = sliding_window_inference(volume[None, None], roi, 3, predictor, overlap=overlap, mode="gaussian")[0]
    cover = max_cover(volume.shape, roi, overlap)
    error = float((out - theirs).abs().max())
    assert error <= (cover / 2) / fixed_scale(cover) + 1e-6, (error, cover)
    assert error > 0  # it is the fixed-point path, not a float32 one


def test_dense_ring_and_blocks_give_the_same_fixed_point_slabs():
    """One prompt's dense int16 ring and the per-class blocks: the same slabs, bit for bit, along z and in a
    transposed frame (slabs along y)."""
    volume = torch.randn(23, 40, 21)
    predictor = _predictor(3)

    def blend(frame, dense_bytes, batch):
        return torch.cat([slab for _, slab in blend_slabs(frame, predictor, 3, roi=(16, 16, 16), overlap=0.5,
                                                          sw_batch_size=batch, mode="gaussian", device=CPU,
                                                          stitch_device=CPU, buffer_dtype=FIXED,
                                                          dense_fixed_bytes=dense_bytes)], dim=1)

    for frame in (volume, volume.transpose(0, 1)):
        dense = blend(frame, 2**30, 2)
        assert torch.equal(dense, blend(frame, 0, 2))
        assert dense.shape[1:] == frame.shape and 0 < float(dense.min()) and float(dense.max()) < 1


def test_max_cover_counts_the_windows_over_the_most_covered_voxel():
    assert max_cover((37, 16, 16), (16, 16, 16), 0.5) == 3  # z starts 0, 8, 16, 21: slices 21-23 lie in three
    assert max_cover((32, 32, 32), (16, 16, 16), 0.5) == 8
    assert max_cover((10, 10, 10), (16, 16, 16), 0.5) == 1


def test_float16_buffer_changes_probabilities_by_at_most_3e_3():
    volume = torch.randn(40, 20, 20)
    exact, _ = _blend(volume, _predictor(2), 2, (16, 16, 16), 0.5, "gaussian")
    half = torch.empty_like(exact)
    for z0, slab in blend_slabs(volume, _predictor(2), 2, roi=(16, 16, 16), overlap=0.5, sw_batch_size=2,
                                mode="gaussian", device=CPU, stitch_device=CPU, buffer_dtype=torch.float16):
        half[:, z0 : z0 + slab.shape[1]] = slab
    assert float((half - exact).abs().max()) < 3e-3


def test_unit_blocks_sum_like_a_dense_int16_array_and_hold_only_where_a_class_has_units():
    """Against a dense int16 buffer: the same sums, bit for bit; absent classes hold no block, small sums 8 bits."""
    from duplus.inference.stitching import UnitBlocks

    gen = torch.Generator().manual_seed(0)
    shape, window = (40, 50, 45), (16, 20, 24)
    dense = torch.zeros((3, *shape), dtype=FIXED)
    blocks = UnitBlocks(3, CPU, block=(8, 16, 16))
    for _ in range(30):
        corner = [int(torch.randint(0, s - w + 1, (1,), generator=gen)) for s, w in zip(shape, window)]
        units = torch.randint(0, 300, (3, *window), generator=gen).float()
        units[0] = 0  # class 0 never present
        units[1] = (units[1] < 3).float()  # class 1: small sums only (background-like)
        dense[(slice(None), *(slice(c, c + w) for c, w in zip(corner, window)))] += units.to(FIXED)
        blocks.add(units, corner)
    assert not any(0 in tiles for row in blocks._rows.values() for tiles in row.values())
    dtypes = {(k, tile.dtype) for row in blocks._rows.values() for tiles in row.values() for k, tile in tiles.items()}
    assert (1, torch.uint8) in dtypes and (2, FIXED) in dtypes and (1, FIXED) not in dtypes
    assert torch.equal(blocks.take(0, 17, 50, 45), dense[:, :17].float())
    blocks.drop(16)  # blocks wholly below slice 16 go; what is left still reads the same
    assert min(blocks._rows) == 2
    assert torch.equal(blocks.take(17, 40, 31, 45), dense[:, 17:, :31].float())


def test_slabs_along_y_give_monai_probabilities_and_the_same_masks():
    """A grid with fewer slices than rows blends in slabs along y (a smaller ring): still MONAI's numbers."""
    from duplus.inference.predict import slab_axis

    torch.manual_seed(0)
    model = DuPLUS(ModelConfig.preset("tiny", text_dim=12)).eval()
    config = {"pretrain": {"patch_size": [16, 16, 16]},
              "inference": {"overlap": 0.5, "sw_batch_size": 2, "blend": "gaussian", "threshold": 0.5}}
    image, ctx, targets = torch.randn(18, 40, 21), torch.randn(12), torch.randn(3, 12)
    assert slab_axis(image.shape, (16, 16, 16)) == 1 and slab_axis((40, 18, 21), (16, 16, 16)) == 0
    probs = predict_probabilities(model, image, "CT", ctx, targets, config, show_progress=False)

    def network(windows):
        with torch.no_grad():
            n = windows.shape[0]
            return model(windows, torch.zeros(n, dtype=torch.long), ctx.expand(n, -1), targets).sigmoid()

    theirs = sliding_window_inference(image[None, None], (16, 16, 16), 2, network, overlap=0.5, mode="gaussian")[0]
    assert torch.allclose(probs, theirs, atol=1e-5), float((probs - theirs).abs().max())
    cut = float(probs.median())
    masks = np.asarray(predict_masks(model, image, "CT", ctx, targets, config, threshold=cut, show_progress=False))
    changed = masks != (probs > cut).numpy()
    assert not changed[(probs - cut).abs().numpy() > 2e-4].any() and 0 < masks.sum() < masks.size

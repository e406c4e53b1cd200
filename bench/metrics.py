"""Seconds per class of the evaluation metrics on a CT-size volume: surface elements vs boundary voxels.

A 300x512x512 volume at 0.8x0.8x2.5 mm (array axes Z, Y, X) holds organ-size masks: a liver-size
ellipsoid (about 1.5 L), a kidney-size one and a 2 cm lesion. Each prediction is its truth shifted by a
few voxels with a smoothly perturbed surface, as a decent model's masks are. Timed per class:

- ``surface_elements``: ``duplus.evaluate.metrics.class_metrics``, what the evaluation computes (Dice,
  plus HD95 and NSD over area-weighted surface elements, DeepMind's definitions);
- ``boundary_voxels``: the code before it, as a yardstick: Dice over the whole volume, then MONAI's
  ``compute_hausdorff_distance(percentile=95)`` and ``compute_surface_dice`` without sub-voxels
  (boundary voxels, unweighted) on the cropped masks.

Prints one JSON object to stdout; progress goes to stderr.

    .venv/bin/python bench/metrics.py > bench/results/metrics-cpu2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import warnings

import numpy as np
import torch
from scipy import ndimage

from duplus import __version__
from duplus.evaluate import metrics

SPACING = (2.5, 0.8, 0.8)  # mm per array axis (Z, Y, X)
# name: (centre as fractions of the volume, semi-axes in mm)
ORGANS = {"liver": ((0.5, 0.45, 0.35), (75.0, 95.0, 55.0)),
          "kidney": ((0.5, 0.6, 0.7), (55.0, 30.0, 25.0)),
          "lesion": ((0.45, 0.4, 0.3), (10.0, 10.0, 10.0))}


def log(message: str) -> None:
    print(f"[bench/metrics] {message}", file=sys.stderr, flush=True)


def organ_pair(shape: tuple[int, ...], centre: tuple[float, ...], semi_axes_mm: tuple[float, ...],
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, truth): an ellipsoid and a shifted copy whose radius wobbles by about 2 mm."""
    lo = [max(int(c * n - a / s) - 8, 0) for c, n, a, s in zip(centre, shape, semi_axes_mm, SPACING)]
    hi = [min(int(c * n + a / s) + 9, n) for c, n, a, s in zip(centre, shape, semi_axes_mm, SPACING)]
    # Only the box around the organ is computed; the rest of the volume stays empty.
    grid = np.meshgrid(*[(np.arange(a, b) - c * n) * s for a, b, c, n, s in zip(lo, hi, centre, shape, SPACING)],
                       indexing="ij", sparse=True)
    radius = np.sqrt(sum((g / a) ** 2 for g, a in zip(grid, semi_axes_mm)))
    smooth = ndimage.gaussian_filter(rng.standard_normal(radius.shape), 4)
    wobble = smooth / smooth.std() * 2.0 / float(np.mean(semi_axes_mm))  # 2 mm in units of the normalised radius
    shift = [1, 2, -2]  # voxels: 2.5 mm, 1.6 mm, 1.6 mm
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    truth = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    truth[box] = radius <= 1.0
    pred[box] = np.roll(radius + wobble, shift, axis=(0, 1, 2)) <= 1.0
    return pred, truth


def boundary_voxel_metrics(pred: np.ndarray, truth: np.ndarray, tolerance_mm: float) -> dict[str, float]:
    """The code before surface elements: MONAI over boundary voxels (erosion), unweighted, quantile interpolated."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    dice = float(compute_dice(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(truth)[None, None].float(),
                              include_background=True, ignore_empty=False)[0, 0])
    cp, ct = metrics._crop_to_union(pred, truth)
    p = torch.from_numpy(metrics._pad(cp))[None, None].float()
    t = torch.from_numpy(metrics._pad(ct))[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=list(SPACING))[0, 0])
        nsd = float(compute_surface_dice(p, t, class_thresholds=[tolerance_mm], include_background=True,
                                         spacing=list(SPACING))[0, 0])
    return {"dice": dice, "hd95": hd95, "nsd": nsd}


def timed(function, repeat: int) -> tuple[float, dict]:
    best, result = float("inf"), {}
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[300, 512, 512], help="volume shape, array order Z Y X")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest counts")
    parser.add_argument("--tolerance-mm", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(args.size)
    rng = np.random.default_rng(args.seed)
    runs = []
    for name, (centre, semi_axes) in ORGANS.items():
        pred, truth = organ_pair(shape, centre, semi_axes, rng)
        log(f"{name}: {int(truth.sum())} truth voxels")
        new_s, new = timed(lambda pred=pred, truth=truth: metrics.class_metrics(pred, truth, SPACING, args.tolerance_mm),
                           args.repeat)
        old_s, old = timed(lambda pred=pred, truth=truth: boundary_voxel_metrics(pred, truth, args.tolerance_mm), args.repeat)
        runs.append({"class": name, "truth_voxels": int(truth.sum()), "truth_ml": float(truth.sum() * np.prod(SPACING) / 1000),
                     "surface_elements": {"seconds": new_s, **new}, "boundary_voxels": {"seconds": old_s, **old},
                     "time_ratio": new_s / old_s})
    result = {
        "benchmark": "metrics", "shape": list(shape), "spacing_mm": list(SPACING), "nsd_tolerance_mm": args.tolerance_mm,
        "runs": runs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "duplus": __version__,
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()

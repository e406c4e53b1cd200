"""Report figures: training curve, Dice boxes, overlays, Kaplan-Meier curves, calibration, LoRA bars, class scaling.

Drawn on bare matplotlib Figures (Agg, no pyplot state) with pinned style and metadata: equal metrics, equal bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from duplus.atomic import atomic_path
from duplus.errors import DataError
from duplus.report.inputs import number
from duplus.report.tables import PROGNOSIS_MODELS, safe_name

# Everything that could differ between machines (user matplotlibrc, fonts, dates) is pinned here.
STYLE = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "path.simplify": True,
    "svg.hashsalt": "duplus",
    "pdf.compression": 6,
    "image.interpolation": "nearest",
    "axes.grid": False,
}
PNG_METADATA = {"Software": None}
PDF_METADATA = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None}


def save_figure(fig: Figure, folder: Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` atomically with fixed metadata; return their paths."""
    written = []
    with matplotlib.rc_context(STYLE):
        for suffix, metadata in ((".png", PNG_METADATA), (".pdf", PDF_METADATA)):
            path = Path(folder) / f"{stem}{suffix}"
            with atomic_path(path, suffix=suffix) as tmp:
                fig.savefig(tmp, format=suffix[1:], metadata=metadata, bbox_inches=None)
            written.append(path)
    return written


def _figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(STYLE):
        return Figure(figsize=(width, height), layout="constrained")


def training_curve(log: pd.DataFrame, folder: Path) -> list[Path]:
    """Loss (left axis) and learning rate (right axis) against the optimizer step."""
    with matplotlib.rc_context(STYLE):
        fig = _figure(6.0, 3.2)
        ax = fig.add_subplot()
        steps = log["step"].astype(float).to_numpy()
        ax.plot(steps, log["loss"].astype(float).to_numpy(), color="tab:blue", lw=1.2, label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss", color="tab:blue")
        lr_ax = ax.twinx()
        lr_ax.plot(steps, log["lr"].astype(float).to_numpy(), color="tab:orange", lw=1.0, ls="--")
        lr_ax.set_ylabel("learning rate", color="tab:orange")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        seconds = number(log["seconds"].iloc[-1]) if len(log) else math.nan
        title = "Universal pretraining"
        if not math.isnan(seconds):
            title += f" ({int(steps[-1])} steps, {seconds:.0f} s)"
        ax.set_title(title)
        return save_figure(fig, folder, "training_curve")


def dice_boxplots(per_case: pd.DataFrame, folder: Path) -> list[Path]:
    """One figure per dataset: the distribution over test cases of each class's Dice."""
    written = []
    for dataset in dict.fromkeys(per_case["dataset"]):
        own = per_case[(per_case["dataset"] == dataset) & (per_case["class"].str.lower() != "mean")]
        classes = list(dict.fromkeys(own["class"]))
        if not classes:
            continue
        data = [own.loc[own["class"] == c, "dice"].astype(float).dropna().to_numpy() for c in classes]
        with matplotlib.rc_context(STYLE):
            fig = _figure(max(3.5, 0.55 * len(classes) + 1.5), 3.4)
            ax = fig.add_subplot()
            ax.boxplot([d if d.size else np.array([np.nan]) for d in data], showmeans=True, widths=0.6)
            for i, values in enumerate(data, start=1):
                # Jitter is seeded by position: points are visible yet identical between runs.
                jitter = np.random.default_rng(i).uniform(-0.12, 0.12, values.size)
                ax.plot(i + jitter, values, ".", color="tab:gray", ms=3, alpha=0.7)
            ax.set_xticks(range(1, len(classes) + 1), classes, rotation=35, ha="right")
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("Dice per case")
            ax.set_title(f"{dataset}: Dice over test cases")
            written += save_figure(fig, folder, f"dice_box_{safe_name(dataset)}")
    return written


def _focus_point(truth: np.ndarray) -> tuple[int, int, int]:
    """The voxel whose three orthogonal slices hold the most truth: per axis, the heaviest slice."""
    mass = truth.reshape(-1, *truth.shape[-3:]).astype(bool).sum(axis=0, dtype=np.int64)
    if not mass.any():
        z, y, x = (s // 2 for s in mass.shape)
        return z, y, x
    z, y, x = (int(np.argmax(mass.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3))
    return z, y, x


def _views(point: tuple[int, int, int], spacing: tuple[float, ...]) -> Iterator[tuple[str, Any, str, float]]:
    """(title, index into (Z,Y,X), image origin, pixel aspect) for the three planes through ``point``.

    Arrays are in LPS order, so axial rows run anterior -> posterior and columns right -> left
    (radiological view); coronal and sagittal put superior at the top.
    """
    z, y, x = point
    sz, sy, sx = spacing
    yield f"axial (z={z})", (z, slice(None), slice(None)), "upper", sy / sx
    yield f"coronal (y={y})", (slice(None), y, slice(None)), "lower", sz / sx
    yield f"sagittal (x={x})", (slice(None), slice(None), x), "lower", sz / sy


def load_example(path: Path) -> dict[str, Any]:
    """Read an examples/{dataset}.npz and check its arrays fit together."""
    try:
        with np.load(path, allow_pickle=False) as data:
            example = {k: data[k] for k in ("image", "pred", "truth", "classes", "spacing")}
    except (KeyError, ValueError, OSError) as error:
        raise DataError(f"{path}: expected arrays image, pred, truth, classes, spacing ({error})") from error
    image, pred, truth = example["image"], example["pred"], example["truth"]
    if image.ndim != 3 or pred.shape != truth.shape or pred.ndim != 4 or pred.shape[1:] != image.shape:
        raise DataError(f"{path}: expected image (Z,Y,X) and pred/truth (K,Z,Y,X) on the same grid, got "
                        f"{image.shape}, {pred.shape}, {truth.shape}")
    if len(example["classes"]) != pred.shape[0] or np.asarray(example["spacing"]).size != 3:
        raise DataError(f"{path}: expected one class name per channel ({pred.shape[0]}) and 3 spacings (z, y, x)")
    return example


def overlay(path: Path, dataset: str, folder: Path) -> list[Path]:
    """Three orthogonal slices through the truth's heaviest point with predicted and true contours.

    Predicted contours are solid, true ones dashed, one colour per class; pixels keep their
    physical aspect from the (z, y, x) spacing.
    """
    example = load_example(path)
    image = example["image"].astype(np.float32)
    pred, truth = example["pred"].astype(bool), example["truth"].astype(bool)
    classes = [str(c) for c in example["classes"]]
    spacing = tuple(float(s) for s in np.asarray(example["spacing"]).ravel())
    finite = image[np.isfinite(image)]
    vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    colors = [matplotlib.colormaps["tab20" if len(classes) > 10 else "tab10"](i % 20) for i in range(len(classes))]
    point = _focus_point(truth)
    with matplotlib.rc_context(STYLE):
        fig = _figure(9.0, 3.6)
        axes = fig.subplots(1, 3)
        for ax, (title, index, origin, aspect) in zip(axes, _views(point, spacing)):
            ax.imshow(image[index], cmap="gray", vmin=vmin, vmax=vmax, origin=origin, aspect=aspect)
            for k, color in enumerate(colors):
                for mask, style in ((truth[k][index], "--"), (pred[k][index], "-")):
                    # A constant slice has no 0.5 level set; contour() would warn. Its default origin
                    # puts Z[i, j] at (j, i), the pixel centres imshow uses for either image origin.
                    if mask.any() and not mask.all():
                        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.0,
                                   linestyles=style)
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
        handles = [Line2D([], [], color=c, lw=1.5, label=n) for c, n in zip(colors, classes)]
        handles += [Line2D([], [], color="black", ls="-", label="prediction"),
                    Line2D([], [], color="black", ls="--", label="ground truth")]
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=7)
        fig.suptitle(f"{dataset}: prediction vs ground truth")
        return save_figure(fig, folder, f"overlay_{safe_name(dataset)}")


def _km_group(curves: dict[str, Any], group: str) -> tuple[np.ndarray, np.ndarray] | None:
    part = curves.get(group)
    if not isinstance(part, dict) or "time" not in part or "survival" not in part:
        return None
    time = np.asarray(part["time"], dtype=float)
    survival = np.asarray(part["survival"], dtype=float)
    if time.shape != survival.shape or time.size == 0:
        return None
    # A KM curve starts at S(0) = 1; prepend it when the writer left it implicit.
    if time[0] > 0:
        time, survival = np.r_[0.0, time], np.r_[1.0, survival]
    return time, survival


def km_curves(km: dict[str, Any], time_label: str = "time", *, folder: Path) -> list[Path]:
    """Kaplan-Meier curves of each model's low- and high-risk groups (one panel per model present).

    Reads ``{model: {"low": {"time": [...], "survival": [...]}, "high": {...}, "logrank_p": p}}``;
    models or groups that are absent or malformed are left out.
    """
    order = [m for m in PROGNOSIS_MODELS if m in km] + sorted(m for m in km if m not in PROGNOSIS_MODELS)
    panels = [(m, km[m]) for m in order if isinstance(km[m], dict)
              and (_km_group(km[m], "low") or _km_group(km[m], "high"))]
    if not panels:
        return []
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    with matplotlib.rc_context(STYLE):
        fig = _figure(3.2 * cols, 2.8 * rows)
        axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).ravel()
        for ax, (model, curves) in zip(axes, panels):
            for group, color in (("low", "tab:green"), ("high", "tab:red")):
                curve = _km_group(curves, group)
                if curve is not None:
                    ax.step(curve[0], curve[1], where="post", color=color, label=f"{group} risk")
            p = number(curves.get("logrank_p"))
            ax.set_title(model + ("" if math.isnan(p) else f" (log-rank p={p:.3g})"))
            ax.set_ylim(0, 1.02)
            ax.set_xlabel(time_label)
            ax.legend(loc="lower left", frameon=False)
        for ax in axes[: len(panels) : cols]:
            ax.set_ylabel("survival probability")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        return save_figure(fig, folder, "km_curves")


def calibration_plot(calibration: dict[str, Any], time_label: str = "time", *, folder: Path) -> list[Path]:
    """Predicted survival at the horizon (x) against the Kaplan-Meier survival of the same group
    (y), one line per model, the diagonal for perfect calibration (prognosis/calibration.json)."""
    horizon = number(calibration.get("horizon"))
    models = calibration.get("models") if isinstance(calibration.get("models"), dict) else {}
    order = [m for m in PROGNOSIS_MODELS if m in models] + sorted(m for m in models if m not in PROGNOSIS_MODELS)
    curves = []
    for model in order:
        entry = models[model]
        if not isinstance(entry, dict):
            continue
        predicted = np.asarray([number(v) for v in entry.get("predicted") or []], dtype=float)
        observed = np.asarray([number(v) for v in entry.get("observed") or []], dtype=float)
        keep = np.isfinite(predicted) & np.isfinite(observed) if predicted.shape == observed.shape else None
        if keep is not None and keep.any():
            curves.append((model, predicted[keep], observed[keep]))
    if not curves or math.isnan(horizon):
        return []
    with matplotlib.rc_context(STYLE):
        fig = _figure(4.2, 3.8)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
        for model, predicted, observed in curves:
            ax.plot(predicted, observed, marker="o", markersize=3, linewidth=1, label=model)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"predicted survival at {time_label} = {horizon:g}")
        ax.set_ylabel("Kaplan-Meier survival")
        ax.legend(loc="upper left", frameon=False, fontsize=7)
        return save_figure(fig, folder, "calibration")


def lora_bars(lora: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    """Grouped bars per adapted center: zero-shot, LoRA and full fine-tuning Dice."""
    keys = sorted(lora)
    if not keys:
        return []
    kinds = (("zero_shot_dice", "zero-shot", "tab:gray"), ("lora_dice", "LoRA", "tab:blue"),
             ("full_ft_dice", "full fine-tuning", "tab:orange"))
    with matplotlib.rc_context(STYLE):
        fig = _figure(max(4.0, 1.6 * len(keys) + 1.5), 3.2)
        ax = fig.add_subplot()
        positions = np.arange(len(keys), dtype=float)
        width = 0.26
        for i, (field, label, color) in enumerate(kinds):
            values = [number(lora[k].get(field)) for k in keys]
            bars = ax.bar(positions + (i - 1) * width, np.nan_to_num(values, nan=0.0), width, label=label, color=color)
            ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.3f}" for v in values], fontsize=7)
        ax.set_xticks(positions, keys)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("mean Dice")
        ax.set_title("Per-center adaptation")
        ax.legend(loc="upper left", ncols=3, frameon=False, fontsize=7)
        return save_figure(fig, folder, "lora_comparison")


def class_scaling(efficiency: dict[str, Any], folder: Path) -> list[Path]:
    """Inference time against the number of prompted classes.

    Reads ``class_scaling`` {"classes": [...], "seconds": [...]} when present; otherwise draws the
    ratio alone as bars of 1 (one class) vs ``class_scaling_ratio`` (all classes).
    """
    curve = efficiency.get("class_scaling")
    with matplotlib.rc_context(STYLE):
        fig = _figure(4.0, 3.0)
        ax = fig.add_subplot()
        if isinstance(curve, dict) and len(curve.get("classes", [])) == len(curve.get("seconds", [])) > 0:
            classes = np.asarray(curve["classes"], dtype=float)
            seconds = np.asarray(curve["seconds"], dtype=float)
            ax.plot(classes, seconds, "o-", color="tab:blue", label="measured")
            ax.plot(classes, seconds[0] * classes / classes[0], ":", color="tab:gray", label="one pass per class")
            ax.set_xlabel("classes prompted")
            ax.set_ylabel("seconds per volume")
            ax.legend(frameon=False)
        else:
            ratio = number(efficiency.get("class_scaling_ratio"))
            if math.isnan(ratio):
                return []
            n = efficiency.get("class_scaling_k")
            many = f"{int(n)} classes" if isinstance(n, (int, float)) and not math.isnan(float(n)) else "all classes"
            bars = ax.bar(["1 class", many], [1.0, ratio], color=["tab:gray", "tab:blue"], width=0.5)
            ax.bar_label(bars, labels=["1.00", f"{ratio:.2f}"])
            ax.set_ylabel("time relative to one class")
            ax.set_ylim(0, max(1.0, ratio) * 1.25)
        ax.set_title("Cost of more classes")
        return save_figure(fig, folder, "class_scaling")

"""Published reference numbers (from the literature, never measured by this pipeline).

Each value carries its source and benchmark so that tables can mark it as published and cite it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

NNUNET_REVISITED = "nnU-Net Revisited (Isensee et al., MICCAI 2024), 5-fold cross-validation"
# Every model of that paper is trained and evaluated in the nnU-Net framework, whose evaluation
# (nnunetv2.evaluation.evaluate_predictions) gives NaN where a class is absent from both masks.
NNUNET_DICE = ("Dice over the 5 cross-validation folds' cases, averaged per class and then over the classes "
               "by nnU-Net's evaluation, which leaves a case out of a class's mean where the class is absent "
               "from both prediction and reference (this pipeline counts it as Dice 1)")


@dataclass(frozen=True)
class PublishedValue:
    """One published number with the precision it was published at and where it comes from."""

    model: str
    metric: str
    value: float
    decimals: int
    source: str
    benchmark: str
    std: float | None = None
    unit: str = ""
    # How the source computed the metric, where it says so (None: the source does not say).
    definition: str | None = None

    def text(self) -> str:
        """The value at its published precision ("0.8308", "0.69 ± 0.02")."""
        main = f"{self.value:.{self.decimals}f}"
        if self.std is None:
            return main
        return f"{main} ± {self.std:.{self.decimals}f}"


def _dice(model: str, percent: float, benchmark: str) -> PublishedValue:
    # Published as percent with 2 decimals; as a fraction that is exactly 4 decimals.
    return PublishedValue(model, "mean Dice", round(percent / 100.0, 4), 4, NNUNET_REVISITED, benchmark,
                          definition=NNUNET_DICE)


# benchmark -> {model: mean Dice}
_SEGMENTATION: dict[str, dict[str, PublishedValue]] = {
    "BTCV": {"nnU-Net": _dice("nnU-Net", 83.08, "BTCV"), "Swin-UNETR": _dice("Swin-UNETR", 78.89, "BTCV")},
    "AMOS22": {"nnU-Net": _dice("nnU-Net", 88.64, "AMOS22"), "Swin-UNETR": _dice("Swin-UNETR", 83.81, "AMOS22")},
    "KiTS23": {"nnU-Net": _dice("nnU-Net", 86.04, "KiTS23"), "Swin-UNETR": _dice("Swin-UNETR", 81.27, "KiTS23")},
    "LiTS": {"nnU-Net": _dice("nnU-Net", 80.09, "LiTS"), "Swin-UNETR": _dice("Swin-UNETR", 76.50, "LiTS")},
}

SEGMENTATION_MODELS: tuple[str, ...] = ("nnU-Net", "Swin-UNETR")

# Our dataset names (and common spellings of them) -> the benchmark whose published number applies.
# KiTS19 cases are a subset of KiTS23, whose number is the closest published one; the table says so.
_DATASET_BENCHMARK: dict[str, str] = {
    "btcv": "BTCV",
    "amos": "AMOS22",
    "amos22": "AMOS22",
    "amos_ct": "AMOS22",
    "kits": "KiTS23",
    "kits19": "KiTS23",
    "kits21": "KiTS23",
    "kits23": "KiTS23",
    "lits": "LiTS",
    "msd_liver": "LiTS",
    "msd_task03_liver": "LiTS",
    "task03_liver": "LiTS",
}

PROGNOSIS: tuple[PublishedValue, ...] = (
    PublishedValue("HECKTOR 2021 best", "C-index", 0.720, 3,
                   "HECKTOR 2021 challenge, best test C-index (MICCAI 2021)", "HECKTOR 2021 test",
                   definition="concordance index of the predicted risk with progression-free survival "
                              "(Task 2's endpoint), on the challenge's test centres"),
    PublishedValue("HECKTOR 2022 best", "C-index", 0.682, 3,
                   "HECKTOR 2022 challenge, best test C-index (MICCAI 2022)", "HECKTOR 2022 test",
                   definition="concordance index of the predicted risk with recurrence-free survival "
                              "(Task 2's endpoint), on the challenge's test centres"),
    PublishedValue("DuPLUS (paper)", "C-index", 0.69, 2,
                   "DuPLUS (Saeed et al., arXiv 2510.03483)", "HECKTOR", std=0.02),
)


@dataclass(frozen=True)
class PublishedEfficiency:
    """Published size / speed of a model; fields left None were not published."""

    model: str
    source: str
    params_m: float | None = None
    gmacs: float | None = None
    window: str | None = None
    seconds_per_volume: float | None = None
    peak_memory_mb: float | None = None
    device: str | None = None
    note: str = ""


EFFICIENCY: tuple[PublishedEfficiency, ...] = (
    PublishedEfficiency("Swin-UNETR (feature size 48)", "Hatamizadeh et al., Swin UNETR (2022)",
                        params_m=62.19, gmacs=321.0, window="96x96x96",
                        note="about 321 G multiply-adds per 96^3 forward pass"),
    PublishedEfficiency("CLIP-Driven Universal Model (U-Net)", "Liu et al., ICCV 2023", params_m=19.08),
    PublishedEfficiency("TotalSegmentator (1.5 mm)", "Wasserthal et al., Radiology: AI 2023",
                        seconds_per_volume=77.0, peak_memory_mb=7600.0, device="RTX 3090",
                        note="one 512x512x280 CT; memory published as 7.6 GB of RAM"),
)


def definition_notes(values: Iterable[PublishedValue]) -> list[str]:
    """One line per distinct published source: how it defines its metric, or that it does not say."""
    notes: dict[tuple[str, str], str] = {}
    for value in values:
        how = value.definition or "the source does not define it further"
        notes.setdefault((value.source, value.metric), f"Published {value.metric} of {value.source}: {how}.")
    return list(notes.values())


def benchmark_for(dataset: str) -> str | None:
    """The published benchmark matching one of our dataset names, or None (e.g. demo datasets)."""
    key = dataset.strip().lower().replace("-", "_").replace(" ", "_")
    return _DATASET_BENCHMARK.get(key)


def published_dice(dataset: str) -> dict[str, PublishedValue]:
    """Published mean Dice per model for ``dataset``; empty when nothing was published for it."""
    benchmark = benchmark_for(dataset)
    return dict(_SEGMENTATION[benchmark]) if benchmark else {}

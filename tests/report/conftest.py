"""Small fake metrics of every stage, in the formats docs/architecture.md specifies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SUMMARY = """dataset,class,dice,hd95,nsd,n
demo_abdomen_ct,liver,0.91234,3.456,0.87654,4
demo_abdomen_ct,liver tumor,0.5,inf,0.4,3
demo_abdomen_ct,mean,0.70617,12.34,0.63827,4
btcv,spleen,0.9,2.0,0.9,2
btcv,mean,0.88888,2.96,0.81234,2
"""

BASELINE = """dataset,class,dice,hd95,nsd,n
btcv,spleen,0.93,1.5,0.95,2
btcv,mean,0.9150,1.75,0.9449,2
"""

PER_CASE = """dataset,case,center,class,dice,hd95,nsd
demo_abdomen_ct,c1,siteA,liver,0.95,2.0,0.9
demo_abdomen_ct,c2,siteA,liver,0.88,4.0,0.85
demo_abdomen_ct,c1,siteA,liver tumor,0.4,8.0,0.3
demo_abdomen_ct,c2,siteA,liver tumor,0.6,,0.5
btcv,b1,siteX,spleen,0.9,2.0,0.9
"""

TRAIN_LOG = "step,loss,lr,seconds\n" + "".join(
    f"{s},{1.5 * np.exp(-s / 40) + 0.1:.6f},{0.002 * min(1, s / 20):.6g},{s * 0.5:.2f}\n" for s in range(0, 121, 10))

LORA = {
    "center": "ct_siteB", "site": "siteB", "dataset": "demo_abdomen_ct", "zero_shot_dice": 0.61234, "lora_dice": 0.80111,
    "full_ft_dice": 0.84, "gap_closed": 0.82921, "trainable_params_lora": 25000, "trainable_params_full": 1000000,
    "total_params": 1000000, "adapter_bytes": 104857, "checkpoint_bytes": 4194304, "seconds_lora": 12.345,
    "seconds_full": 20.0, "peak_rss_mb_lora": 900.4, "peak_rss_mb_full": 1100.6,
    "per_class": {"liver": {"zero_shot_dice": 0.7, "lora_dice": 0.85, "full_ft_dice": 0.88},
                  "liver tumor": {"zero_shot_dice": 0.52, "lora_dice": 0.75, "full_ft_dice": 0.8}},
}

PROGNOSIS_SUMMARY = """model,harrell_c_mean,harrell_c_std,uno_c_mean,uno_c_std,ibs_mean,ibs_std
ehr_coxph,0.65432,0.04321,0.64,0.05,0.2012,0.0123
ehr_rsf,0.6,0.03,0.59,0.04,0.21,0.01
image_ehr_text,0.71249,0.02,0.70,0.03,0.18,0.02
"""

FOLDS = """model,fold,harrell_c,uno_c,ibs,mean_auc,note
ehr_coxph,0,0.6,0.6,0.2,0.6,
ehr_coxph,1,0.7,0.68,0.2,0.7,
image_ehr_text,0,0.7,0.7,0.18,0.7,
image_ehr_text,1,0.72,0.7,0.18,0.7,fold 1: no events in center C
"""

KM = {
    "ehr_coxph": {"low": {"time": [0, 5, 10, 20], "survival": [1.0, 0.9, 0.8, 0.7]},
                  "high": {"time": [0, 3, 8, 15], "survival": [1.0, 0.7, 0.5, 0.3]}, "logrank_p": 0.0123},
    "image_ehr_text": {"low": {"time": [2, 6, 12], "survival": [0.95, 0.9, 0.85]},
                       "high": {"time": [1, 4, 9], "survival": [0.8, 0.5, 0.2]}, "logrank_p": 0.001},
}

EFFICIENCY = {"params": 1234567, "macs_per_window": 2.5e9, "window": [32, 32, 32], "seconds_per_volume": 1.23456,
              "peak_rss_mb": 812.6, "class_scaling_ratio": 1.08, "device": "cpu"}


def write_example(path: Path) -> None:
    """A 12x16x20 volume with two classes; the liver's heaviest slices are z=7, y=9, x=11."""
    image = np.linspace(-1, 1, 12 * 16 * 20, dtype=np.float32).reshape(12, 16, 20)
    truth = np.zeros((2, 12, 16, 20), np.uint8)
    truth[0, 4:10, 6:12, 8:14] = 1
    truth[0, 7, 9, 11:18] = 1  # extra mass on one line so the focus point is unique
    truth[1, 6:8, 8:10, 11] = 1
    pred = np.roll(truth, 1, axis=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, image=image, pred=pred, truth=truth, classes=np.array(["liver", "liver tumor"]),
             spacing=np.array([4.0, 2.0, 2.0]))


def write_results(root: Path, prognosis: bool = True) -> Path:
    """Write a fake results folder with every stage's metrics; return it."""
    files = {
        "pretrain/train_log.csv": TRAIN_LOG,
        "evaluate/universal/summary.csv": SUMMARY,
        "evaluate/universal/per_case.csv": PER_CASE,
        "evaluate/baseline/summary.csv": BASELINE,
        "evaluate/universal/efficiency.json": json.dumps(EFFICIENCY),
        "lora/ct_siteB/metrics.json": json.dumps(LORA),
    }
    if prognosis:
        files.update({"prognosis/summary.csv": PROGNOSIS_SUMMARY, "prognosis/folds.csv": FOLDS,
                      "prognosis/km.json": json.dumps(KM)})
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    write_example(root / "evaluate/universal/examples/demo_abdomen_ct.npz")
    return root


def make_config(tmp: Path) -> dict:
    manifest = tmp / "data/preprocessed/demo_abdomen_ct/manifest.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("dataset,case\ndemo_abdomen_ct,c1\n")
    return {
        "seed": 0,
        "paths": {"raw": str(tmp / "data/raw"), "preprocessed": str(tmp / "data/preprocessed"),
                  "results": str(tmp / "results")},
        "datasets": {"demo_abdomen_ct": {}, "btcv": {}},
        "prognosis": {"enabled": True},
        "report": {"published": True},
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return write_results(tmp_path / "results")


@pytest.fixture
def config(tmp_path: Path) -> dict:
    return make_config(tmp_path)

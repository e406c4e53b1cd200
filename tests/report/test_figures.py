"""Figures: focus point of the overlays, tolerance of partial inputs, PNG/PDF determinism."""

import numpy as np
import pandas as pd
import pytest

from duplus.errors import DataError
from duplus.report import figures

from .conftest import EFFICIENCY, KM, LORA, write_example


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_focus_point_is_heaviest_slice_per_axis():
    truth = np.zeros((1, 10, 10, 10), np.uint8)
    truth[0, 2, 3:6, 3:6] = 1
    truth[0, 2:9, 7, 8] = 1
    assert figures._focus_point(truth) == (2, 7, 8)
    assert figures._focus_point(np.zeros((2, 4, 6, 8), np.uint8)) == (2, 3, 4)


def test_views_follow_spacing_aspect():
    views = list(figures._views((1, 2, 3), (4.0, 2.0, 1.0)))
    assert [v[0] for v in views] == ["axial (z=1)", "coronal (y=2)", "sagittal (x=3)"]
    assert [v[3] for v in views] == [2.0, 4.0, 2.0]
    assert [v[2] for v in views] == ["upper", "lower", "lower"]


def test_overlay_writes_png_and_pdf(tmp_path):
    example = tmp_path / "ex.npz"
    write_example(example)
    paths = figures.overlay(example, "demo_abdomen_ct", folder=tmp_path / "fig")
    assert [p.name for p in paths] == ["overlay_demo_abdomen_ct.png", "overlay_demo_abdomen_ct.pdf"]
    width, height = _png_size(paths[0])
    assert width > 300 and height > 150
    assert paths[1].read_bytes().startswith(b"%PDF")


def test_overlay_rejects_mismatched_arrays(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, image=np.zeros((4, 4, 4)), pred=np.zeros((1, 4, 4, 5), np.uint8),
             truth=np.zeros((1, 4, 4, 5), np.uint8), classes=np.array(["liver"]), spacing=np.ones(3))
    with pytest.raises(DataError, match="bad.npz"):
        figures.overlay(path, "x", folder=tmp_path)
    np.savez(path, image=np.zeros((4, 4, 4)))
    with pytest.raises(DataError, match="expected arrays"):
        figures.load_example(path)


def test_km_tolerates_missing_models_and_groups(tmp_path):
    km = {"ehr_coxph": KM["ehr_coxph"], "image_mlp": {"low": KM["image_ehr_text"]["low"]},
          "ehr_rsf": "not a dict", "ehr_mlp": {"logrank_p": 0.5}}
    paths = figures.km_curves(km, folder=tmp_path)
    assert [p.name for p in paths] == ["km_curves.png", "km_curves.pdf"]
    assert figures.km_curves({"ehr_mlp": {"low": {"time": [], "survival": []}}}, folder=tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


def test_km_prepends_time_zero():
    time, survival = figures._km_group({"low": {"time": [2, 5], "survival": [0.9, 0.8]}}, "low")
    assert time.tolist() == [0.0, 2.0, 5.0] and survival.tolist() == [1.0, 0.9, 0.8]


def test_class_scaling_curve_ratio_and_nothing(tmp_path):
    curve = dict(EFFICIENCY, class_scaling={"classes": [1, 2, 4], "seconds": [1.0, 1.02, 1.05]})
    assert len(figures.class_scaling(curve, folder=tmp_path / "a")) == 2
    assert len(figures.class_scaling(EFFICIENCY, folder=tmp_path / "b")) == 2
    assert figures.class_scaling({"params": 1}, folder=tmp_path / "c") == []


def test_figure_is_byte_identical_when_redrawn(tmp_path):
    # The full report's determinism is checked in test_build; this pins the bare save path.
    first = figures.lora_bars({"ct_siteB": LORA, "other": {"lora_dice": 0.5}}, folder=tmp_path / "one")
    second = figures.lora_bars({"ct_siteB": LORA, "other": {"lora_dice": 0.5}}, folder=tmp_path / "two")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert b"CreationDate" not in first[1].read_bytes()


def test_dice_boxplots_one_figure_per_dataset(tmp_path):
    per_case = pd.DataFrame({"dataset": ["d", "d", "e", "e"], "case": list("abcd"),
                             "class": ["liver", "mean", "spleen", "spleen"], "dice": [0.9, 0.9, 0.7, np.nan]})
    paths = figures.dice_boxplots(per_case, folder=tmp_path)
    assert [p.name for p in paths] == ["dice_box_d.png", "dice_box_d.pdf", "dice_box_e.png", "dice_box_e.pdf"]


def test_calibration_plot_draws_models_with_points_and_skips_empty(tmp_path):
    calibration = {"horizon": 24.0, "models": {
        "ehr_coxph": {"predicted": [0.2, 0.5, 0.8], "observed": [0.25, None, 0.7], "n": [10, 10, 10]},
        "ehr_rsf": {"predicted": [], "observed": [], "n": []}, "broken": "not a dict"}}
    paths = figures.calibration_plot(calibration, "time (months)", folder=tmp_path)
    assert [p.name for p in paths] == ["calibration.png", "calibration.pdf"]
    assert figures.calibration_plot({"horizon": None, "models": {}}, folder=tmp_path / "none") == []
    assert figures.calibration_plot({"horizon": 5, "models": {"m": calibration["models"]["ehr_rsf"]}},
                                    folder=tmp_path / "none") == []
    assert not (tmp_path / "none").exists()

"""`duplus segment` says when a prompt is outside what the model was trained on (zero-shot), and
`duplus list-classes --weights` lists what it was."""

from __future__ import annotations

import json

import torch
from segment_helpers import TEXT_DIM, make_setup

from duplus.cli import main
from duplus.model import DuPLUS, ModelConfig, save_model
from duplus.segment.api import segment_image
from duplus.segment.knowledge import trained_on, zero_shot_notes


def _weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "known.safetensors"
    save_model(DuPLUS(ModelConfig.preset("tiny", text_dim=TEXT_DIM)), path,
               {"text_encoder": "fake@000", "patch_size": [16, 16, 16],
                "classes": {"demo_abdomen_ct": ["liver", "spleen"], "demo_abdomen_mri": ["liver"]}})
    return path


def test_prompts_the_model_never_trained_on_are_warned_about_and_reported(tmp_path, monkeypatch, caplog):
    setup = make_setup(tmp_path, monkeypatch)
    weights = _weights(tmp_path)
    with caplog.at_level("WARNING", logger="duplus.segment"):
        report = segment_image(str(setup["scan"]), str(tmp_path / "out"), "liver, liver tumor", "CT",
                               weights=str(weights), device="cpu", config=setup["config"])
    assert report["zero_shot"] == ["'liver tumor': the model was never trained on this class: zero-shot, expect a "
                                   "poor or empty mask"]
    assert "'liver tumor': the model was never trained on this class" in caplog.text
    assert json.loads((tmp_path / "out" / "report.json").read_text())["zero_shot"] == report["zero_shot"]


def test_modality_region_and_class_pairs_outside_training():
    entries = trained_on({"classes": {"demo_abdomen_ct": ["liver", "spleen"], "demo_abdomen_mri": ["liver"]}})
    assert [(e["modality"], e["region"]) for e in entries] == [("CT", "abdomen"), ("MRI", "abdomen")]
    assert zero_shot_notes(entries, "CT", "abdomen", ["liver", "spleen"]) == []
    assert zero_shot_notes(entries, "MRI", "abdomen", ["spleen"]) == [
        "'spleen': trained only on CT abdomen, not on MRI abdomen: zero-shot here"]
    assert zero_shot_notes(entries, "PET", "head and neck", ["liver"])[0].startswith(
        "the model was never trained on PET head and neck scans (it was on: CT abdomen, MRI abdomen)")
    assert zero_shot_notes([], "CT", "abdomen", ["anything"]) == []  # nothing recorded: nothing claimed


def test_list_classes_with_weights_lists_what_they_were_trained_on(tmp_path, capsys):
    weights = _weights(tmp_path)
    assert main(["list-classes", "--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert f"{weights} was trained on:" in out
    assert "demo_abdomen_ct" in out and "liver, spleen" in out and "MRI" in out

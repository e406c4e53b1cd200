"""`duplus segment` says when a prompt is outside what the model was trained on (zero-shot), and
`duplus list-classes --weights` lists what it was."""

from __future__ import annotations

import json

import pytest
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


CAUDATE = {"name": "left caudate", "region": "brain", "parent": "caudate", "synonyms": ["caudate l"],
           "prompt": "left caudate nucleus"}
CAUDATES = {"name": "caudate", "region": "brain", "parent": None, "synonyms": [], "prompt": "A {scan} showing both caudates."}


def _declaring_config(classes):
    return {"datasets": {"mine": {"kind": "msd", "root": "/nowhere", "modality": "MRI", "region": "brain",
                                  "labels": {1: "left caudate"}, "classes": classes}}}


def test_recorded_classes_resolve_by_name_and_synonym_with_their_trained_sentence():
    from duplus.data import taxonomy
    from duplus.prompts.templates import target_prompt
    from duplus.segment.knowledge import use_model_classes

    recorded = use_model_classes([({"declared_classes": [CAUDATES, CAUDATE]}, "w/model.json")], {})
    assert recorded == ["caudate", "left caudate"]
    assert taxonomy.canonical_name("Caudate L") == "left caudate" and taxonomy.parents("left caudate") == ["caudate"]
    assert target_prompt("MRI", "left caudate", "T1") == ("A T1-weighted Magnetic Resonance Imaging scan of a left caudate "
                                                          "nucleus.")
    assert target_prompt("CT", "caudate") == "A computed tomography scan showing both caudates."


def test_a_sidecar_without_recorded_classes_still_loads_and_takes_the_config_classes(tmp_path):
    from duplus.data import taxonomy
    from duplus.model import load_model
    from duplus.segment.knowledge import recorded_classes, use_model_classes

    weights = _weights(tmp_path)  # written without declared_classes, as before the field existed
    model, sidecar = load_model(weights)
    assert "declared_classes" not in sidecar and recorded_classes(sidecar, "model.json") == []
    config = _declaring_config({"left caudate": {"synonyms": ["lc"], "prompt": "left caudate nucleus"}})
    assert use_model_classes([(sidecar, "model.json")], config) == []
    assert taxonomy.canonical_name("lc") == "left caudate"


def test_a_config_agreeing_with_the_weights_adds_its_synonyms_and_a_differing_one_is_a_conflict():
    from duplus.data import taxonomy
    from duplus.errors import ConfigError
    from duplus.segment.knowledge import use_model_classes

    records = [({"declared_classes": [CAUDATES, CAUDATE]}, "w/model.json")]
    same = _declaring_config({"left caudate": {"parent": "Caudate", "synonyms": ["lc"], "prompt": "left  caudate nucleus"},
                              "caudate": {"prompt": "A {scan} showing both caudates."}})
    use_model_classes(records, same)
    assert taxonomy.canonical_name("lc") == taxonomy.canonical_name("caudate l") == "left caudate"
    other = _declaring_config({"left caudate": {"prompt": "caudate"}, "brainstem nucleus": {"synonyms": ["caudate l"]}})
    with pytest.raises(ConfigError) as caught:
        use_model_classes(records, other)
    message = str(caught.value)
    assert ("class 'left caudate': the config (--config, default ./config.yaml) declares it in datasets.mine.classes with "
            "region 'brain', no parent, prompt 'caudate'" in message)
    assert "w/model.json records that the weights were trained with region 'brain', parent 'caudate'" in message
    assert "class 'brainstem nucleus': 'caudate l' is also a name or synonym of declared class 'left caudate'" in message


def test_an_adapter_record_adds_its_classes_and_must_agree_with_the_weights(tmp_path):
    from duplus.data import taxonomy
    from duplus.errors import ConfigError
    from duplus.segment.knowledge import adapter_record, use_model_classes

    center = tmp_path / "lora" / "siteB"
    (center / "adapter").mkdir(parents=True)
    (center / "adapter_meta.json").write_text(json.dumps({"declared_classes": [CAUDATES]}))
    expected = ({"declared_classes": [CAUDATES]}, str(center / "adapter_meta.json"))
    assert adapter_record(center / "adapter") == adapter_record(center) == expected
    use_model_classes([({"declared_classes": []}, "model.json"), adapter_record(center)], {})
    assert taxonomy.canonical_name("caudate") == "caudate"
    changed = {**CAUDATES, "region": "head and neck"}
    with pytest.raises(ConfigError, match=r"class 'caudate': model.json records it with region 'brain'.*adapter_meta.json "
                                          r"with region 'head and neck'"):
        use_model_classes([({"declared_classes": [CAUDATES]}, "model.json"), ({"declared_classes": [changed]},
                                                                              "adapter_meta.json")], {})


def test_a_recorded_class_now_built_in_is_left_out_with_a_warning_and_a_malformed_record_is_named(caplog):
    from duplus.data import taxonomy
    from duplus.errors import ModelError
    from duplus.segment.knowledge import use_model_classes

    builtin = {**CAUDATE, "name": "hippocampus", "parent": None, "synonyms": []}
    with caplog.at_level("WARNING"):
        assert use_model_classes([({"declared_classes": [builtin]}, "model.json")], {}) == []
    assert "class 'hippocampus' recorded with the weights (model.json) is left out: its name is already the built-in" \
           in caplog.text
    assert taxonomy.declared_classes() == []
    with pytest.raises(ModelError, match=r"w/model.json: declared_classes\[1\]: 'region' must be a non-empty text, got "
                                         r"None; 'synonyms' must be a list of texts, got 'x'"):
        use_model_classes([({"declared_classes": [CAUDATES, {"name": "x", "synonyms": "x"}]}, "w/model.json")], {})


def test_list_classes_with_a_config_marks_its_declared_classes(tmp_path, capsys):
    import yaml

    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(_declaring_config({"left caudate": {"synonyms": ["lc"]}})))
    assert main(["list-classes", "--config", str(tmp_path / "mine.yaml")]) == 0
    out = capsys.readouterr().out
    assert "left caudate *" in out and out.rstrip().endswith("* declared by the config (datasets.<name>.classes), not built in")
    assert "liver *" not in out

"""The settings each stage depends on: what changes results is tracked, what changes speed is not."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from duplus.tracked import stage_settings

ROOT_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


@pytest.fixture()
def config():
    with open(ROOT_CONFIG, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def test_speed_only_settings_are_not_tracked(config):
    before = stage_settings("universal_pretrain", config)
    faster = copy.deepcopy(config)
    faster["pretrain"].update(num_workers=8, compile=True, channels_last=True, checkpoint_every=7, log_every=3)
    faster["inference"]["sw_batch_size"] = 16
    faster["lora"]["checkpoint_every"] = 3
    assert stage_settings("universal_pretrain", faster) == before
    assert stage_settings("lora_center", faster, center="ct_siteB") == \
        stage_settings("lora_center", config, center="ct_siteB")
    assert stage_settings("evaluate", faster) == stage_settings("evaluate", config)
    assert "num_workers" not in before["pretrain"] and before["pretrain"]["lr"] == config["pretrain"]["lr"]


def test_every_speed_only_setting_is_a_schema_setting_with_its_reason():
    from duplus.tracked import CASE_SELECTION, SPEED_ONLY

    schema = yaml.safe_load((ROOT_CONFIG.parent / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
    for section, keys in [*SPEED_ONLY.items(), *CASE_SELECTION.items()]:
        known = schema["properties"][section]["properties"]
        assert set(keys) <= set(known), section
    assert all(reason.strip() for keys in SPEED_ONLY.values() for reason in keys.values())


FASTER = {"pretrain": {"num_workers": 3, "compile": True, "channels_last": True, "checkpoint_every": 7, "processes": 2,
                       "log_every": 3},
          "inference": {"sw_batch_size": 5, "channels_last": False, "blend_buffer_mb": 10.0}, "prompts": {"batch_size": 3},
          "lora": {"checkpoint_every": 11}}


def _with_every_speed_only_setting_changed(config):
    from duplus.tracked import SPEED_ONLY

    assert {name: set(keys) for name, keys in FASTER.items()} == {name: set(keys) for name, keys in SPEED_ONLY.items()}
    faster = copy.deepcopy(config)
    for section, values in FASTER.items():
        faster[section].update(values)
    return faster


def test_fingerprints_and_resume_keys_follow_the_one_list(config):
    """Pretraining's fingerprint, the LoRA phase's settings and the evaluation journal's settings
    ignore every speed-only setting, and notice a setting that changes results."""
    from duplus.evaluate.evaluate_stage import journal_settings
    from duplus.train.adaptation_keys import lora_phase_settings
    from duplus.train.pretrain import PretrainSettings

    def identities(cfg):
        return (PretrainSettings.from_config(cfg).fingerprint(), lora_phase_settings(cfg), journal_settings(cfg))

    assert identities(_with_every_speed_only_setting_changed(config)) == identities(config)
    for section, key, value in (("pretrain", "lr", 1e-2), ("lora", "rank", 3), ("inference", "overlap", 0.25),
                                ("evaluate", "nsd_tolerance_mm", 5.0)):
        changed = copy.deepcopy(config)
        changed[section][key] = value
        assert identities(changed) != identities(config), key
    selected = copy.deepcopy(config)
    selected["evaluate"].update(split="train", max_cases_per_dataset=3)  # other cases, the same numbers per case
    assert journal_settings(selected) == journal_settings(config)
    assert stage_settings("evaluate", selected) != stage_settings("evaluate", config)


def test_restating_a_value_in_another_key_order_changes_no_params_text(config):
    """A merged --configfile puts the keys it sets first; Snakemake compares params as text."""
    reordered = copy.deepcopy(config)
    for section in ("pretrain", "model", "inference", "lora", "prognosis", "preprocess"):
        reordered[section] = dict(reversed(list(reordered[section].items())))
    for stage, wildcards in (("universal_pretrain", {}), ("evaluate", {}), ("lora_center", {"center": "ct_siteB"}),
                             ("prognosis", {}), ("preprocess", {"dataset": "demo_abdomen_ct"}), ("report", {})):
        assert str(stage_settings(stage, reordered, **wildcards)) == str(stage_settings(stage, config, **wildcards))


def test_result_settings_are_tracked_by_the_stages_that_use_them(config):
    changed = copy.deepcopy(config)
    changed["lora"]["steps"] += 1
    assert stage_settings("lora_center", changed, center="ct_siteB") != stage_settings("lora_center", config,
                                                                                       center="ct_siteB")
    assert stage_settings("universal_pretrain", changed) == stage_settings("universal_pretrain", config)
    changed["preprocess"]["spacing"] = [3.0, 3.0, 3.0]
    assert stage_settings("preprocess", changed, dataset="demo_abdomen_ct") != \
        stage_settings("preprocess", config, dataset="demo_abdomen_ct")


def test_a_center_job_tracks_its_own_center_only(config):
    more = copy.deepcopy(config)
    more["lora"]["centers"]["another"] = {"dataset": "demo_abdomen_mri", "center": "siteB"}
    assert stage_settings("lora_center", more, center="ct_siteB") == stage_settings("lora_center", config,
                                                                                    center="ct_siteB")


def test_demo_settings_concern_demo_downloads_only(config):
    config["datasets"]["my_ct"] = {"kind": "msd", "root": "/data/my_ct", "modality": "CT", "region": "abdomen",
                                   "labels": {"1": "liver"}}
    assert stage_settings("download", config, dataset="demo_abdomen_ct")["demo"] == config["demo"]["cases_per_center"]
    assert stage_settings("download", config, dataset="my_ct")["demo"] is None
    # Each demo dataset tracks the one size it is generated with.
    bigger = copy.deepcopy(config)
    bigger["demo"]["headneck_patients"] += 10
    for name, changes in (("demo_abdomen_ct", False), ("demo_abdomen_mri", False), ("demo_headneck_pet", True)):
        assert (stage_settings("download", bigger, dataset=name) != stage_settings("download", config, dataset=name)) \
            == changes, name
    with pytest.raises(KeyError, match="no tracked settings"):
        stage_settings("nonsense", config)


def test_stages_may_only_name_datasets_of_the_run(config):
    from duplus.data.registry import check_dataset_references
    from duplus.errors import ConfigError

    check_dataset_references(config)  # the demo is consistent
    for section, value, key in (("prognosis", {"dataset": "btcv"}, "prognosis.dataset 'btcv'"),
                                ("lora", {"centers": {"x": {"dataset": "amos_ct", "center": "a"}}},
                                 "lora.centers.x.dataset 'amos_ct'"),
                                ("pretrain", {"exclude_centers": {"lits": ["b"]}}, "exclude_centers: 'lits'")):
        broken = copy.deepcopy(config)
        broken[section].update(value)
        with pytest.raises(ConfigError, match=key):
            check_dataset_references(broken)
    config["prognosis"].update(enabled=False, dataset="btcv")
    check_dataset_references(config)  # a switched-off stage names nothing


def test_switched_off_lora_names_no_dataset(config):
    from duplus.data.registry import check_dataset_references

    config["lora"].update(enabled=False, centers={"x": {"dataset": "amos_ct", "center": "a"}})
    check_dataset_references(config)


def test_stages_do_not_track_settings_they_never_read(config):
    changed = copy.deepcopy(config)
    changed["evaluate"]["nsd_tolerance_mm"] = 5.0  # LoRA scores Dice only
    assert stage_settings("lora_center", changed, center="ct_siteB") == stage_settings("lora_center", config,
                                                                                       center="ct_siteB")
    assert stage_settings("evaluate", changed) != stage_settings("evaluate", config)
    changed["inference"]["overlap"] = 0.25  # prognosis reads the threshold only
    assert stage_settings("prognosis", changed) == stage_settings("prognosis", config)
    changed["inference"]["threshold"] = 0.4
    assert stage_settings("prognosis", changed) != stage_settings("prognosis", config)


def test_the_prognosis_endpoint_reruns_the_report_not_the_stage(config):
    changed = copy.deepcopy(config)
    changed["prognosis"]["endpoint"] = "overall survival"      # a label of Table 3 only
    assert stage_settings("prognosis", changed) == stage_settings("prognosis", config)
    assert stage_settings("report", changed) != stage_settings("report", config)


def _own(tmp_path, labels, **extra):
    return {"kind": "msd", "root": str(tmp_path), "modality": "CT", "region": "abdomen", "sequence": None,
            "labels": labels, **extra}


@pytest.mark.parametrize("relabel", [
    {"1": "Liver", "2": "Hepatic Tumour"},
    {"0": "background", "1": "liver", "2": "liver tumor"},
    {"2": "lesion of the liver", "1": "LIVER"},
])
def test_an_equivalent_relabel_reruns_nothing(config, tmp_path, relabel):
    config["datasets"] = {"mine": _own(tmp_path, {"1": "liver", "2": "liver tumour"})}
    relabelled = copy.deepcopy(config)
    relabelled["datasets"]["mine"]["labels"] = relabel
    for stage in ("download", "preprocess"):
        assert stage_settings(stage, relabelled, dataset="mine") == stage_settings(stage, config, dataset="mine")
    assert stage_settings("cache_prompts", relabelled) == stage_settings("cache_prompts", config)


def test_a_relabel_to_other_classes_reruns_prompts_and_preprocessing_not_the_download(config, tmp_path):
    config["datasets"] = {"mine": _own(tmp_path, {"1": "liver", "2": "liver tumour"})}
    changed = copy.deepcopy(config)
    changed["datasets"]["mine"]["labels"] = {"1": "spleen", "2": "liver tumour"}
    assert stage_settings("preprocess", changed, dataset="mine") != stage_settings("preprocess", config, dataset="mine")
    assert stage_settings("cache_prompts", changed) != stage_settings("cache_prompts", config)
    assert stage_settings("download", changed, dataset="mine") == stage_settings("download", config, dataset="mine")


def test_a_declared_class_is_tracked_by_what_it_means(config, tmp_path):
    declared = {"left caudate": {"prompt": "left caudate nucleus", "synonyms": ["l caudate"]}}
    config["datasets"] = {"mine": _own(tmp_path, {"1": "left caudate"}, classes=declared)}
    respelt = copy.deepcopy(config)
    respelt["datasets"]["mine"].update(labels={"1": "L Caudate"},
                                       classes={"Left_Caudate": {"prompt": "left caudate nucleus",
                                                                 "synonyms": ["l caudate", "caudate left"]}})
    assert stage_settings("cache_prompts", respelt) == stage_settings("cache_prompts", config)
    reworded = copy.deepcopy(config)
    reworded["datasets"]["mine"]["classes"]["left caudate"]["prompt"] = "caudate nucleus of the left hemisphere"
    assert stage_settings("cache_prompts", reworded) != stage_settings("cache_prompts", config)
    assert stage_settings("preprocess", reworded, dataset="mine") != stage_settings("preprocess", config, dataset="mine")


def test_the_demo_datasets_keep_their_tracked_settings(config):
    from snakemake.utils import validate

    validate(config, str(ROOT_CONFIG.parent / "schemas" / "config.schema.yaml"))
    assert stage_settings("download", config, dataset="demo_abdomen_ct")["dataset"] == {"sequence": None}
    assert stage_settings("preprocess", config, dataset="demo_abdomen_ct")["dataset"] == {"sequence": None}
    assert stage_settings("cache_prompts", config)["datasets"] == {name: {"sequence": None} for name in
                                                                   config["datasets"]}

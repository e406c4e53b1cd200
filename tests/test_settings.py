"""Typed config settings: every default comes from the schema, filled in as Snakemake's validate fills it."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from duplus.errors import ConfigError
from duplus.settings import Settings, schema, section_dict, with_defaults

ROOT = Path(__file__).resolve().parents[1]


def _demo_config():
    return yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))


def _snakemake_filled(config):
    """What the Snakefile hands the library: the config after Snakemake's own validate."""
    from snakemake.utils import validate

    config = copy.deepcopy(config)
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    return config


@pytest.mark.parametrize("given", [{}, {"inference": {"overlap": 0.25}, "prognosis": {"ehr": {"time": "os"}}}, "demo"])
def test_defaults_fill_as_snakemake_validate_fills_them(given):
    config = _demo_config() if given == "demo" else given
    before = copy.deepcopy(config)
    assert with_defaults(config) == _snakemake_filled(config)
    assert config == before  # the caller's config is left as it was


def test_typed_access():
    settings = Settings.of({"pretrain": {"amp": "bf16", "patch_size": [16, 32, 48]}, "lora": {"alpha": 8},
                            "prognosis": {"dataset": ["a_ct", "a_pet"]}})
    assert settings.pretrain.amp == "bf16" and settings.pretrain.patch_size == (16, 32, 48)
    assert settings.lora.alpha == 8.0 and isinstance(settings.lora.alpha, float)
    assert settings.prognosis.dataset == ("a_ct", "a_pet")
    assert settings.prognosis.ehr.time == "rfs_months" and settings.prognosis.evaluation.horizons is None
    assert settings.inference.sw_batch_size is None and settings.resources.jobs["evaluate"]["cpus_per_gpu"] == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.pretrain.amp = "off"  # type: ignore[misc]
    assert Settings.of(settings) is settings


def test_a_value_of_the_wrong_type_is_named_by_its_key():
    with pytest.raises(ConfigError) as raised:
        Settings.of({"inference": {"overlap": "half"}, "pretrain": {"steps": 2.5}})
    # Every problem at once, each by its dotted key.
    assert "inference.overlap: 'half' is not of type 'number'" in str(raised.value)
    assert "pretrain.steps: 2.5 is not of type 'integer'" in str(raised.value)
    with pytest.raises(ConfigError, match="prognosis.ehr: Additional properties are not allowed .'tiem' was unexpected"):
        Settings.of({"prognosis": {"ehr": {"tiem": "os"}}})


def test_extra_keys_stay_where_the_schema_allows_them():
    settings = Settings.of({"model": {"overrides": {"channels": [8, 16]}},
                            "prognosis": {"ehr": {"columns": {"age": {"unit": "years"}}}},
                            "lora": {"centers": {"x": {"dataset": "d", "center": "c"}, "gone": None}},
                            "datasets": {"mine": {"anything": "the registry checks datasets"}}})
    assert settings.model.overrides == {"channels": [8, 16]}
    assert settings.prognosis.ehr.columns == {"age": {"unit": "years"}}
    assert settings.lora.centers == {"x": {"dataset": "d", "center": "c"}}  # null removes an entry, as in the Snakefile
    assert set(settings.datasets) == {"mine"}


def _schema_of(path):
    node = schema()
    for name in path:
        node = node["properties"][name]
    return node


def test_no_field_has_a_default_of_its_own_and_every_field_is_a_defaulted_schema_key():
    import typing

    def walk(cls, path):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, field.name
            node = _schema_of((*path, field.name))
            assert "default" in node, ".".join((*path, field.name))
            if dataclasses.is_dataclass(hints[field.name]):
                walk(hints[field.name], (*path, field.name))

    walk(Settings, ())
    # Every section the schema describes has its class, with every key the schema lists.
    typed = typing.get_type_hints(Settings)
    for name, node in schema()["properties"].items():
        if dataclasses.is_dataclass(typed[name]) and "properties" in node:
            assert {f.name for f in dataclasses.fields(typed[name])} == set(node["properties"]), name


def test_the_schema_defaults_round_trip():
    filled = with_defaults({})
    settings = Settings.of({})
    for field in dataclasses.fields(Settings):
        if field.name == "datasets":  # as written: the registry fills and checks each dataset's settings
            assert set(settings.datasets) == set(filled["datasets"])
            continue
        assert section_dict(getattr(settings, field.name)) == filled[field.name], field.name
    assert settings.evaluate.nsd_tolerance_mm == _schema_of(("evaluate", "nsd_tolerance_mm"))["default"]


def test_a_partial_segment_config_gets_the_schema_inference_defaults(tmp_path):
    from duplus.inference.predict import inference_settings
    from duplus.segment.request import default_paths, load_config

    (tmp_path / "config.yaml").write_text("paths: {results: elsewhere}\npretrain: {patch_size: [32, 32, 32]}\n")
    config = load_config(str(tmp_path / "config.yaml"))
    inference = _schema_of(("inference",))["properties"]
    resolved = inference_settings(config)
    for key, name in (("overlap", "overlap"), ("mode", "blend"), ("threshold", "threshold")):
        assert resolved[key] == inference[name]["default"], name
    assert resolved["roi"] == (32, 32, 32)
    assert Settings.of(config).inference == Settings.of({}).inference
    weights, cache = default_paths(config)
    assert Path(weights).parts[0] == "elsewhere" and Path(cache).name == "minilm.safetensors"


@pytest.mark.parametrize("given", ["demo", {}, {"pretrain": {"lr": 1e-3}, "inference": {"overlap": 0.25}}])
def test_fingerprints_do_not_depend_on_who_filled_the_defaults(given):
    """A config as written and as the Snakefile's validate fills it: the same pretraining fingerprint and
    evaluation journal key, whether the library or Snakemake filled in the schema's defaults."""
    import json

    from duplus.data.preprocess import settings as preprocess_options
    from duplus.evaluate.evaluate_stage import journal_settings
    from duplus.inference.predict import inference_settings
    from duplus.train.pretrain import PretrainSettings

    config = _demo_config() if given == "demo" else given
    filled = _snakemake_filled(config)
    # The staged cases' resume key hashes the preprocessing options as text.
    assert json.dumps(preprocess_options(config)) == json.dumps(preprocess_options(filled))
    assert PretrainSettings.from_config(config).fingerprint() == PretrainSettings.from_config(filled).fingerprint()
    assert inference_settings(config) == inference_settings(filled)
    assert journal_settings(filled)["inference"] == journal_settings(config)["inference"]

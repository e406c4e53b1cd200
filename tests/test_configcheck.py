"""Config checks made when the Snakefile is read: dataset settings, data roots, one-line schema errors."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from duplus.configcheck import check_config, schema_error
from duplus.data.taxonomy import canonical_label_map
from duplus.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def config():
    return yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))


def _mine(tmp_path: Path, **changes):
    table = tmp_path / "cases.csv"
    table.write_text("image,label\n")
    return {"kind": "csv", "root": str(table), "modality": "CT", "region": "abdomen", "labels": {"1": "liver"},
            **changes}


def test_the_demo_config_passes(config):
    check_config(config)


@pytest.mark.parametrize("changes, message", [
    ({"labels": {"1": "livr"}}, "datasets.mine.labels.1: 'livr' is not a known class"),
    ({"root": "/no/such/cases.csv"}, "datasets.mine.root: '/no/such/cases.csv' is not a file"),
    ({"region": None}, "datasets.mine: a csv dataset needs region"),
    ({"kind": "nifti"}, "datasets.mine.kind: 'nifti' is not one of"),
])
def test_a_dataset_mistake_names_its_key(config, tmp_path, changes, message):
    config["datasets"]["mine"] = _mine(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_config(config)


def test_an_unknown_region_is_used_as_written_with_a_warning(config, tmp_path, caplog):
    config["datasets"]["mine"] = _mine(tmp_path, region="abdomn")
    with caplog.at_level(logging.WARNING):
        check_config(config)
    assert "datasets.mine.region: 'abdomn' is none of the regions" in caplog.text


def test_background_as_msd_lists_it_is_accepted():
    assert canonical_label_map({0: "background", 1: "Liver"}) == {1: "liver"}
    with pytest.raises(DataError, match="labels.0: label id must be a positive integer"):
        canonical_label_map({0: "liver"})


def test_a_schema_error_is_one_line_naming_the_key_and_files(config):
    bad = copy.deepcopy(config)
    bad["lora"]["rank"] = 0
    with pytest.raises(WorkflowError) as raised:
        validate(bad, str(ROOT / "schemas" / "config.schema.yaml"))
    error = schema_error(raised.value, ["config.yaml", "mine.yaml", "config.yaml"])
    assert str(error) == "lora.rank: 0 is less than the minimum of 1 (config files: config.yaml, mine.yaml)"
    assert schema_error(WorkflowError("something else")) is None


def test_a_nested_command_line_value_read_as_text_gets_a_hint(config):
    from snakemake.cli import parse_config

    # What `snakemake --config 'lora={"steps": 81}'` merges into the config: the value as text.
    bad = copy.deepcopy(config)
    bad["lora"].update(parse_config(['lora={"steps": 81}'])["lora"])
    assert bad["lora"]["steps"] == "81"
    with pytest.raises(WorkflowError) as raised:
        validate(bad, str(ROOT / "schemas" / "config.schema.yaml"))
    assert str(schema_error(raised.value, ["config.yaml"])) == (
        "lora.steps: '81' is not of type 'integer' (config files: config.yaml); Snakemake passes nested "
        "--config values as text: put them in a --configfile")


@pytest.mark.parametrize("key, value, hinted", [
    ("preprocess.test_fraction", "0.3", True),     # number
    ("pretrain.compile", "true", True),            # boolean
    ("pretrain.steps", "2.5", False),              # text of a number, but no integer: the value is wrong
    ("pretrain.steps", "many", False),
    ("pretrain.compile", "1", False),              # YAML reads 1 as an integer, not a boolean
])
def test_the_hint_is_given_only_for_text_of_the_expected_type(config, key, value, hinted):
    section, leaf = key.split(".")
    bad = copy.deepcopy(config)
    bad[section][leaf] = value
    with pytest.raises(WorkflowError) as raised:
        validate(bad, str(ROOT / "schemas" / "config.schema.yaml"))
    message = str(schema_error(raised.value))
    assert message.startswith(f"{key}: '{value}' is not of type")
    assert ("nested --config values as text" in message) is hinted


def test_settings_a_built_in_dataset_would_ignore_are_refused(config):
    config["datasets"]["demo_abdomen_ct"] = {"modality": "MRI", "region": "thorax", "center": "X"}
    with pytest.raises(ConfigError, match=r"^datasets\.demo_abdomen_ct\.modality: 'demo_abdomen_ct' is a built-in "
                                          r"dataset, whose modality, region, center cannot be set"):
        check_config(config)


def test_a_built_in_dataset_takes_a_root_and_nulls(config, tmp_path):
    # The schema fills in `sequence: null`; `root` reads a local copy in place.
    config["datasets"]["demo_abdomen_ct"] = {"root": str(tmp_path), "sequence": None, "channel": None}
    check_config(config)


def _prognosis_on(config, dataset, **ehr):
    config["datasets"][dataset] = {}
    config["prognosis"]["dataset"] = dataset
    config["prognosis"]["ehr"].update(ehr)
    config["paths"]["raw"] = "/no/such/raw"
    return config


def test_a_prognosis_dataset_without_an_ehr_table_fails_when_read(config):
    with pytest.raises(ConfigError, match=r"^prognosis\.dataset: 'demo_abdomen_ct' comes with no EHR table \(of the "
                                          r"built-in datasets only demo_headneck_pet, hecktor2022_ct, hecktor2022_pet do\)"):
        check_config(_prognosis_on(config, "demo_abdomen_ct"))


@pytest.mark.parametrize("dataset, ehr", [
    ("hecktor2022_pet", {}),                       # its instructions place the table
    ("demo_abdomen_ct", {"table": "ehr.csv"}),     # the config names one
])
def test_a_prognosis_dataset_with_an_ehr_table_passes(config, dataset, ehr):
    check_config(_prognosis_on(config, dataset, **ehr))


def test_a_table_put_in_place_by_hand_or_prognosis_off_passes(config, tmp_path):
    _prognosis_on(config, "demo_abdomen_ct")
    config["prognosis"]["enabled"] = False
    check_config(config)
    config["prognosis"]["enabled"] = True
    config["paths"]["raw"] = str(tmp_path)
    (tmp_path / "demo_abdomen_ct").mkdir()
    (tmp_path / "demo_abdomen_ct" / "clinical.csv").write_text("patient_id\n")
    check_config(config)


def test_stages_may_list_several_scans_of_the_same_patients(config):
    """prognosis.dataset and a LoRA center's dataset take a list; each name must be a dataset of the run."""
    config["datasets"].update(hecktor2022_ct={}, hecktor2022_pet={})
    config["prognosis"]["dataset"] = ["hecktor2022_ct", "hecktor2022_pet"]
    config["lora"]["centers"]["chup"] = {"dataset": ["hecktor2022_ct", "hecktor2022_pet"], "center": "CHUP"}
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    config["paths"]["raw"] = "/no/such/raw"
    check_config(config)  # the table is HECKTOR's, placed with the images of both

    del config["datasets"]["hecktor2022_pet"]
    config["lora"]["centers"]["chup"]["dataset"] = ["hecktor2022_ct", "amos_ct", "hecktor2022_pet"]
    with pytest.raises(ConfigError) as raised:
        check_config(config)
    lines = str(raised.value).splitlines()
    assert lines[0] == "3 problems in the config:"
    assert [line.split(" is not")[0].strip() for line in lines[1:]] == [
        "prognosis.dataset 'hecktor2022_pet'", "lora.centers.chup.dataset 'amos_ct'",
        "lora.centers.chup.dataset 'hecktor2022_pet'"]


@pytest.mark.parametrize("key, value, message", [
    ("prognosis", [], "[] should be non-empty"),
    ("prognosis", ["demo_headneck_pet", "demo_headneck_pet"], "has non-unique elements"),
    ("lora", [], "[] should be non-empty"),
    ("lora", ["demo_abdomen_ct", 3], "3 is not of type 'string'"),
])
def test_a_list_of_datasets_is_not_empty_and_names_each_once(config, key, value, message):
    bad = copy.deepcopy(config)
    if key == "prognosis":
        bad["prognosis"]["dataset"] = value
    else:
        bad["lora"]["centers"]["ct_siteB"]["dataset"] = value
    with pytest.raises(WorkflowError) as raised:
        validate(bad, str(ROOT / "schemas" / "config.schema.yaml"))
    assert message in str(schema_error(raised.value))

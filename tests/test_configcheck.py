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

"""Input functions of rules/common.smk: what makes Snakemake rerun a stage."""

from __future__ import annotations

from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "rules" / "common.smk"


def input_functions(config: dict) -> dict:
    """rules/common.smk holds plain Python functions that read a global ``config``."""
    namespace = {"config": config}
    exec(compile(COMMON.read_text(encoding="utf-8"), str(COMMON), "exec"), namespace)
    return namespace


def make_config(tmp_path: Path, dataset: str, table: str | None = None) -> dict:
    return {"paths": {"raw": str(tmp_path / "raw"), "preprocessed": str(tmp_path / "pre")},
            "datasets": {dataset: {}}, "prognosis": {"dataset": dataset, "ehr": {"table": table}}}


def place_table(tmp_path: Path, dataset: str) -> Path:
    path = tmp_path / "raw" / dataset / "clinical.csv"
    path.parent.mkdir(parents=True)
    path.write_text("patient_id\n")
    return path


def test_a_named_table_is_an_input(tmp_path):
    inputs = input_functions(make_config(tmp_path, "hecktor2022", table="ehr.csv"))["prognosis_inputs"]()
    assert inputs == {"manifest": tmp_path / "pre" / "hecktor2022" / "manifest.csv", "ehr": "ehr.csv"}


def test_the_default_table_put_in_place_by_hand_is_an_input(tmp_path):
    functions = input_functions(make_config(tmp_path, "hecktor2022"))
    assert "ehr" not in functions["prognosis_inputs"]()       # not there yet: the stage says so itself
    clinical = place_table(tmp_path, "hecktor2022")
    assert functions["prognosis_inputs"]()["ehr"] == clinical


def test_a_table_the_download_writes_is_not_an_input(tmp_path):
    dataset = "demo_headneck_pet"
    # It appears during the first run; an input that appears between runs would rerun prognosis
    # once for nothing (the download record, upstream of the manifest, covers it).
    place_table(tmp_path, dataset)
    assert input_functions(make_config(tmp_path, dataset))["prognosis_inputs"]() == {
        "manifest": tmp_path / "pre" / dataset / "manifest.csv"}

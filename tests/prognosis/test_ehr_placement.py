"""Where the prognosis stage looks for a dataset's EHR table when the config names none."""

from pathlib import Path

from duplus.prognosis.ehr import EHRSchema
from duplus.prognosis.prognosis_stage import _ehr_path


def test_hecktors_table_lies_in_the_one_placement_its_ct_and_pet_datasets_read(tmp_path):
    config = {"paths": {"raw": str(tmp_path)}}
    schema = EHRSchema(table=None)
    for dataset in ("hecktor2022_ct", "hecktor2022_pet"):
        assert _ehr_path(config, schema, dataset) == Path(tmp_path) / "hecktor2022" / "clinical.csv"
    assert _ehr_path(config, schema, "demo_headneck_pet") == Path(tmp_path) / "demo_headneck_pet" / "clinical.csv"

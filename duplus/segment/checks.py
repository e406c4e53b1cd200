"""Sanity checks of a `duplus segment` run: options that contradict each other, and a scan that looks
like another modality than the one given.

The network is steered by the prompts and the modality's normalisation; a wrong modality, region or
sequence does not fail, it gives empty or wrong masks. So contradictions are refused, and doubtful
values are warned about before the model runs.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from duplus.errors import ConfigError

log = logging.getLogger("duplus.segment")

# Air is about -1000 HU; soft tissue, fat and fluid lie above -200. -500 separates the two.
AIR_HU = -500.0
# Below this share of voxels under -500 a "CT" has no air at all: no body outline, no lungs, no gas.
NO_AIR_FRACTION = 1e-3


def _article(modality: str) -> str:
    return "an" if modality == "MRI" else "a"  # "an MRI", "a PET", "a CT"


def check_sequence(sequence: str | None, modality: str) -> None:
    """An MRI sequence (T1, T2, FLAIR...) given for a CT or PET scan: the two options contradict each other."""
    if sequence and sequence.strip() and modality != "MRI":
        raise ConfigError(f"--sequence {sequence} is an MRI sequence, but --modality is {modality}: a {modality} "
                          "scan has no sequence; drop --sequence, or give --modality MRI")


def check_dataset_modality(dataset: str, dataset_modality: str, modality: str) -> None:
    """Classes of a dataset of one modality asked for on a scan of another."""
    if dataset_modality != modality:
        raise ConfigError(f"--dataset-classes {dataset} is {_article(dataset_modality)} {dataset_modality} dataset, "
                          f"but --modality is "
                          f"{modality}; give --modality {dataset_modality}, or name the classes with --prompts")


def known_regions(config: Mapping[str, Any] | None = None) -> list[str]:
    """Body regions a model can have been trained on: the taxonomy's, the built-in datasets' and the config's."""
    from duplus.data.registry import builtin_datasets, enabled_datasets
    from duplus.data.taxonomy import REGIONS

    regions = list(REGIONS) + [spec.region for spec in builtin_datasets().values()]
    try:
        regions += [spec.region for spec in enabled_datasets(dict(config or {}))]
    except Exception:  # noqa: BLE001 - a broken datasets section is the pipeline's to report, not this warning's
        pass
    return list(dict.fromkeys(regions))


def warn_if_unknown_region(region: str, config: Mapping[str, Any] | None = None) -> bool:
    """Warn when ``--region`` is none of the known regions: the context prompt then names a region no
    training scan had (a typo such as "abdomn" gives a prompt the model never saw). Not an error: a
    model trained on data of one's own may know more regions."""
    regions = known_regions(config)
    if region in regions:
        return False
    close = difflib.get_close_matches(region, regions, n=3, cutoff=0.6)
    hint = f" (did you mean: {', '.join(close)}?)" if close else ""
    log.warning("--region %r is not a known body region%s; known: %s. The context prompt uses it as typed",
                region, hint, ", ".join(regions))
    return True


def _sample(scan: Any) -> np.ndarray:
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(scan)
    return values.ravel()[:: max(1, values.size // 1_000_000)]  # a million voxels decide


def warn_if_ct_like(scan: Any, modality: str, image: str | Path) -> bool:
    """Warn when an MRI or PET scan holds air-like Hounsfield units: a CT given the wrong --modality.

    MRI and PET intensities are not negative (beyond small reconstruction noise); a CT's air is
    about -1000 HU.
    """
    if modality == "CT":
        return False
    sample = _sample(scan)
    if sample.size and float(np.percentile(sample, 5)) < AIR_HU:
        log.warning("%s: 5 %% of its voxels are below -500, as air is in a CT (Hounsfield units); %s %s scan has no "
                    "such values: is --modality %s right?", image, _article(modality), modality, modality)
        return True
    return False


def warn_if_not_ct_like(scan: Any, modality: str, image: str | Path) -> bool:
    """Warn when a scan run as CT has no air: an MRI or PET given --modality CT, or a CT whose values
    are not Hounsfield units (stored without the -1024 offset, 0..4095). Every CT shows air around
    the body or in lungs and bowel at about -1000 HU, and the CT normalisation clips to a HU window,
    so such a scan comes out as empty or wrong masks."""
    if modality != "CT":
        return False
    sample = _sample(scan)
    if not sample.size:
        return False
    below = float(np.count_nonzero(sample < AIR_HU)) / sample.size
    if below < NO_AIR_FRACTION:
        log.warning("%s: essentially no voxels are below -500 (%.2g %%), but a CT in Hounsfield units shows air at "
                    "about -1000: is it an MRI or PET scan (is --modality CT right?), or a CT stored without its "
                    "Hounsfield offset (rescale it to HU first)?", image, 100.0 * below)
        return True
    return False


def warn_if_wrong_modality(scan: Any, modality: str, image: str | Path) -> bool:
    """Either warning above, whichever applies to ``modality``."""
    return warn_if_ct_like(scan, modality, image) or warn_if_not_ct_like(scan, modality, image)

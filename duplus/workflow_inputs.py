"""What each rule of the pipeline reads and where it writes, from the run's config: the input functions
and path helpers of the Snakefile, as plain functions that take the config (rules/common.smk binds them).

``config`` is the run's config as the Snakefile validated it, so every key the schema defaults is there
(``duplus.settings.filled_config`` gives the same outside Snakemake). Built on ``duplus.results_layout``
(the one map of the results folder). Snakemake reruns a job when one
of its inputs or tracked settings changes, so what these functions return decides what a run redoes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from duplus.data.registry import USER_KINDS, get_dataset, listed_datasets, raw_folder
from duplus.results_layout import PROGNOSIS_FILES, ResultsLayout
from duplus.tracked import stage_settings

Config = Mapping[str, Any]


def raw_dir(config: Config) -> Path:
    return Path(config["paths"]["raw"])


def preprocessed_dir(config: Config) -> Path:
    return Path(config["paths"]["preprocessed"])


def results(config: Config) -> ResultsLayout:
    """Where each stage writes (duplus.results_layout): the rules' outputs and inputs alike."""
    return ResultsLayout(config["paths"]["results"])


def log_dir(config: Config) -> Path:
    return Path(config["paths"]["logs"])


def dataset_names(config: Config) -> list[str]:
    return sorted(config["datasets"])


def download_record(dataset: str, config: Config) -> Path:
    return raw_dir(config) / dataset / "download.json"


def user_dataset_index(dataset: str, config: Config) -> list[Path]:
    """The file that lists a user dataset's cases (an MSD folder's dataset.json, a CSV dataset's
    table), as an input of its download: a case added to it, or an edited row, reruns the download
    and so every stage after it. Built-in datasets have none: their files do not change."""
    spec = get_dataset(dataset, config)
    if spec.kind not in USER_KINDS:
        return []
    index = Path(spec.root) / "dataset.json" if spec.kind == "msd" else Path(spec.root)
    # An MSD folder without dataset.json is listed from imagesTr/ alone: nothing to watch.
    return [index] if index.is_file() else []


def manifest_path(dataset: str, config: Config) -> Path:
    return preprocessed_dir(config) / dataset / "manifest.csv"


def all_manifests(config: Config) -> list[Path]:
    return [manifest_path(name, config) for name in dataset_names(config)]


def prompt_cache(config: Config) -> Path:
    return results(config).prompt_cache(config["prompts"]["encoder"])


def pretrained_model(config: Config) -> Path:
    return results(config).model


def pretrained_sidecar(config: Config) -> Path:
    """model.json beside the weights (config, encoder, sha256): the report's provenance reads it."""
    return results(config).model_sidecar


def baseline_models(config: Config) -> list[Path]:
    return [results(config).baseline(name) / "model.safetensors" for name in dataset_names(config)]


def baseline_outputs(config: Config) -> list[Path]:
    if not config["baseline"]["enabled"]:
        return []
    return [results(config).baseline_evaluation("summary.csv")]


def lora_centers(config: Config) -> list[str]:
    if not config["lora"]["enabled"]:
        return []
    return sorted(config["lora"]["centers"])


def lora_metrics(config: Config) -> list[Path]:
    return [results(config).lora_center(center) / "metrics.json" for center in lora_centers(config)]


def prognosis_datasets(config: Config) -> list[str]:
    """The datasets whose scans give prognosis its image features (prognosis.dataset: one name, a
    list of scans of the same patients, or null for EHR only)."""
    return listed_datasets(config["prognosis"]["dataset"])


def prognosis_manifests(config: Config) -> list[Path]:
    return [manifest_path(name, config) for name in prognosis_datasets(config)]


def prognosis_inputs(config: Config) -> dict[str, Any]:
    """The image manifests (one per dataset of prognosis.dataset), the prompt cache, the pretrained
    model and the EHR table, so that edits to any rerun prognosis: the table the config names, else
    clinical.csv in the first dataset's raw folder (when it is there; HECKTOR's CT and PET datasets
    share one, duplus.data.registry.raw_folder). With prognosis.dataset: null (EHR only) the named
    table alone."""
    table = config["prognosis"]["ehr"]["table"]
    if not prognosis_datasets(config):
        # The stage itself says so in one line when the table is not named.
        return {"ehr": table} if table else {}
    images = {"manifests": prognosis_manifests(config), "prompts": prompt_cache(config),
              "model": pretrained_model(config)}
    if table:
        return {**images, "ehr": table}
    default = raw_folder(get_dataset(prognosis_datasets(config)[0], config), raw_dir(config)) / "clinical.csv"
    return {**images, **({"ehr": default} if _placed_by_hand(default, config) else {})}


def _placed_by_hand(clinical: Path, config: Config) -> bool:
    """No rule declares clinical.csv. A table put in place before the run is an input; one that the
    download job writes (demo, url, package datasets) appears mid-run, and an input that appears
    between runs would rerun prognosis once for nothing: the download record, upstream of the
    manifest, already covers it."""
    spec = get_dataset(prognosis_datasets(config)[0], config)
    return clinical.is_file() and not (spec.kind in ("demo", "url", "package") and spec.root is None)


def prognosis_outputs(config: Config) -> list[Path]:
    """What the report reads of the prognosis stage: the summary, the folds, the KM curves, the
    time-dependent AUC, the calibration curves and the cohort's warnings."""
    if not config["prognosis"]["enabled"]:
        return []
    return [results(config).prognosis(name) for name in PROGNOSIS_FILES]


def report_inputs(config: Config) -> dict[str, Any]:
    """Every file the report reads (duplus.report.inputs and its provenance) that a rule writes."""
    layout = results(config)
    return {
        "evaluation": layout.universal_evaluation("summary.csv"),
        "per_case": layout.universal_evaluation("per_case.csv"),
        "efficiency": layout.universal_evaluation("efficiency.json"),
        "examples": layout.universal_evaluation("examples"),
        "train_log": layout.train_log,
        "model_sidecar": pretrained_sidecar(config),
        "prompt_manifest": layout.prompt_manifest(config["prompts"]["encoder"]),
        "lora": lora_metrics(config),
        "prognosis": prognosis_outputs(config),
        "baseline": baseline_outputs(config),
    }


def report_index(config: Config) -> Path:
    return results(config).report("index.html")


def tracked(stage: str, config: Config, wildcards: Mapping[str, str]) -> dict[str, Any]:
    """The settings a job of ``stage`` with these wildcards depends on (``duplus.tracked``), as its
    params: Snakemake reruns the job when they change."""
    return stage_settings(stage, config, **{key: value for key, value in wildcards.items()})

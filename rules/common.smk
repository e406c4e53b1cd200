# Input functions and path helpers shared by the rules (functions only, no rules).
from pathlib import Path

from duplus.data.registry import USER_KINDS, get_dataset, listed_datasets, raw_folder
from duplus.jobresources import job_resources, job_threads  # noqa: F401 - the rules' threads and resources
from duplus.results_layout import PROGNOSIS_FILES, ResultsLayout
from duplus.tracked import stage_settings


def raw_dir():
    return Path(config["paths"]["raw"])


def preprocessed_dir():
    return Path(config["paths"]["preprocessed"])


def results():
    """Where each stage writes (duplus.results_layout): the rules' outputs and inputs alike."""
    return ResultsLayout(config["paths"]["results"])


def log_dir():
    return Path(config["paths"].get("logs", "logs"))


def dataset_names():
    return sorted(config["datasets"])


def download_record(dataset):
    return raw_dir() / dataset / "download.json"


def dataset_download_record(wildcards):
    return download_record(wildcards.dataset)


def user_dataset_index(wildcards):
    """The file that lists a user dataset's cases (an MSD folder's dataset.json, a CSV dataset's
    table), as an input of its download: a case added to it, or an edited row, reruns the download
    and so every stage after it. Built-in datasets have none: their files do not change."""
    spec = get_dataset(wildcards.dataset, config)
    if spec.kind not in USER_KINDS:
        return []
    index = Path(spec.root) / "dataset.json" if spec.kind == "msd" else Path(spec.root)
    # An MSD folder without dataset.json is listed from imagesTr/ alone: nothing to watch.
    return [index] if index.is_file() else []


def manifest_path(dataset):
    return preprocessed_dir() / dataset / "manifest.csv"


def all_manifests(wildcards=None):
    return [manifest_path(name) for name in dataset_names()]


def prompt_cache(wildcards=None):
    return results().prompt_cache(config["prompts"]["encoder"])


def pretrained_model(wildcards=None):
    return results().model


def pretrained_sidecar(wildcards=None):
    """model.json beside the weights (config, encoder, sha256): the report's provenance reads it."""
    return results().model_sidecar


def baseline_models(wildcards=None):
    return [results().baseline(name) / "model.safetensors" for name in dataset_names()]


def baseline_outputs(wildcards=None):
    if not config["baseline"]["enabled"]:
        return []
    return [results().baseline_evaluation("summary.csv")]


def lora_centers():
    if not config["lora"].get("enabled", True):
        return []
    return sorted(config["lora"]["centers"])


def lora_metrics(wildcards=None):
    return [results().lora_center(center) / "metrics.json" for center in lora_centers()]


def prognosis_datasets():
    """The datasets whose scans give prognosis its image features (prognosis.dataset: one name, a
    list of scans of the same patients, or null for EHR only)."""
    return listed_datasets(config["prognosis"].get("dataset"))


def prognosis_manifests(wildcards=None):
    return [manifest_path(name) for name in prognosis_datasets()]


def prognosis_inputs(wildcards=None):
    """The image manifests (one per dataset of prognosis.dataset), the prompt cache, the pretrained
    model and the EHR table, so that edits to any rerun prognosis: the table the config names, else
    clinical.csv in the first dataset's raw folder (when it is there; HECKTOR's CT and PET datasets
    share one, duplus.data.registry.raw_folder). With prognosis.dataset: null (EHR only) the named
    table alone."""
    table = (config["prognosis"].get("ehr") or {}).get("table")
    if not prognosis_datasets():
        # The stage itself says so in one line when the table is not named.
        return {"ehr": table} if table else {}
    images = {"manifests": prognosis_manifests(), "prompts": prompt_cache(), "model": pretrained_model()}
    if table:
        return {**images, "ehr": table}
    default = raw_folder(get_dataset(prognosis_datasets()[0], config), raw_dir()) / "clinical.csv"
    return {**images, **({"ehr": default} if _placed_by_hand(default) else {})}


def _placed_by_hand(clinical):
    """No rule declares clinical.csv. A table put in place before the run is an input; one that the
    download job writes (demo, url, package datasets) appears mid-run, and an input that appears
    between runs would rerun prognosis once for nothing: the download record, upstream of the
    manifest, already covers it."""
    spec = get_dataset(prognosis_datasets()[0], config)
    return clinical.is_file() and not (spec.kind in ("demo", "url", "package") and spec.root is None)


def prognosis_outputs(wildcards=None):
    """What the report reads of the prognosis stage: the summary, the folds, the KM curves, the
    time-dependent AUC, the calibration curves and the cohort's warnings."""
    if not config["prognosis"]["enabled"]:
        return []
    return [results().prognosis(name) for name in PROGNOSIS_FILES]


def report_inputs(wildcards=None):
    """Every file the report reads (duplus.report.inputs and its provenance) that a rule writes."""
    return {
        "evaluation": results().universal_evaluation("summary.csv"),
        "per_case": results().universal_evaluation("per_case.csv"),
        "efficiency": results().universal_evaluation("efficiency.json"),
        "examples": results().universal_evaluation("examples"),
        "train_log": results().train_log,
        "model_sidecar": pretrained_sidecar(),
        "prompt_manifest": results().prompt_manifest(config["prompts"]["encoder"]),
        "lora": lora_metrics(),
        "prognosis": prognosis_outputs(),
        "baseline": baseline_outputs(),
    }


def report_index():
    return results().report("index.html")


def tracked(stage):
    """The settings a job of ``stage`` depends on, as params: Snakemake reruns the job when they change."""

    def settings(wildcards):
        return stage_settings(stage, config, **{key: value for key, value in wildcards.items()})

    return settings

# Input functions and path helpers shared by the rules (functions only, no rules).
from pathlib import Path

from duplus.data.registry import get_dataset
from duplus.tracked import stage_settings


def raw_dir():
    return Path(config["paths"]["raw"])


def preprocessed_dir():
    return Path(config["paths"]["preprocessed"])


def results_dir():
    return Path(config["paths"]["results"])


def log_dir():
    return Path(config["paths"].get("logs", "logs"))


def dataset_names():
    return sorted(config["datasets"])


def download_record(dataset):
    return raw_dir() / dataset / "download.json"


def dataset_download_record(wildcards):
    return download_record(wildcards.dataset)


def manifest_path(dataset):
    return preprocessed_dir() / dataset / "manifest.csv"


def all_manifests(wildcards=None):
    return [manifest_path(name) for name in dataset_names()]


def prompt_cache(wildcards=None):
    return results_dir() / "prompts" / f"{config['prompts']['encoder']}.safetensors"


def pretrained_model(wildcards=None):
    return results_dir() / "pretrain" / "model.safetensors"


def baseline_models(wildcards=None):
    return [results_dir() / "baseline" / name / "model.safetensors" for name in dataset_names()]


def baseline_outputs(wildcards=None):
    if not config["baseline"]["enabled"]:
        return []
    return [results_dir() / "evaluate" / "baseline" / "summary.csv"]


def lora_centers():
    if not config["lora"].get("enabled", True):
        return []
    return sorted(config["lora"]["centers"])


def lora_metrics(wildcards=None):
    return [results_dir() / "lora" / center / "metrics.json" for center in lora_centers()]


def prognosis_manifest(wildcards=None):
    return manifest_path(config["prognosis"]["dataset"])


def prognosis_inputs(wildcards=None):
    """The image manifest and the EHR table, so that edits to either rerun prognosis: the table the
    config names, else clinical.csv in the dataset's raw folder (when it is there)."""
    table = (config["prognosis"].get("ehr") or {}).get("table")
    if table:
        return {"manifest": prognosis_manifest(), "ehr": table}
    default = raw_dir() / config["prognosis"]["dataset"] / "clinical.csv"
    return {"manifest": prognosis_manifest(), **({"ehr": default} if _placed_by_hand(default) else {})}


def _placed_by_hand(clinical):
    """No rule declares clinical.csv. A table put in place before the run is an input; one that the
    download job writes (demo, url, package datasets) appears mid-run, and an input that appears
    between runs would rerun prognosis once for nothing: the download record, upstream of the
    manifest, already covers it."""
    spec = get_dataset(config["prognosis"]["dataset"], config)
    return clinical.is_file() and not (spec.kind in ("demo", "url", "package") and spec.root is None)


def prognosis_outputs(wildcards=None):
    if not config["prognosis"]["enabled"]:
        return []
    return [results_dir() / "prognosis" / "summary.csv"]


def report_inputs(wildcards=None):
    return {
        "evaluation": results_dir() / "evaluate" / "universal" / "summary.csv",
        "train_log": results_dir() / "pretrain" / "train_log.csv",
        "lora": lora_metrics(),
        "prognosis": prognosis_outputs(),
        "baseline": baseline_outputs(),
    }


def report_index():
    return results_dir() / "report" / "index.html"


def gpus():
    """GPUs per GPU-capable job; 0 on the demo, set per rule by the slurm profile."""
    return config["resources"]["gpus"]


def tracked(stage):
    """The settings a job of ``stage`` depends on, as params: Snakemake reruns the job when they change."""

    def settings(wildcards):
        return stage_settings(stage, config, **{key: value for key, value in wildcards.items()})

    return settings

# Input functions and path helpers shared by the rules (functions only, no rules).
from pathlib import Path

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
    """The image manifest, and a user's EHR table when the config names one (edits to it rerun prognosis)."""
    table = (config["prognosis"].get("ehr") or {}).get("table")
    return {"manifest": prognosis_manifest(), **({"ehr": table} if table else {})}


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

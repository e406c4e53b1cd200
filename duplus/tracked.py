"""The config settings each pipeline stage's results depend on.

The rules declare them as Snakemake ``params``, so editing one of them (a ``--configfile`` that
changes ``lora.steps``, a new dataset that needs more prompts) reruns exactly the stages it
affects and what lies downstream of them. Settings that change only speed or bookkeeping (worker
counts, compilation, memory layout, checkpoint spacing, batch sizes of pure inference) are left
out: changing them must never restart a long pretraining. ``SPEED_ONLY`` is the one list of them;
the fingerprints and resume keys of training, adaptation and evaluation are derived from it too.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

# The one statement of which settings do not change results: the rules' params, the pretraining
# fingerprint, the LoRA phases' keys and the evaluation journal's key all leave these out. Each
# changes speed, memory or bookkeeping; what a stage computes stays the same up to the rounding of
# floating-point sums (which already differs between devices and kernel choices). Per key: why.
SPEED_ONLY: dict[str, dict[str, str]] = {
    "pretrain": {
        "num_workers": "loader processes: every sample is a function of (seed, step, index in step), whoever cuts it",
        "compile": "torch.compile runs the same operations, fused (rounding only)",
        "channels_last": "the memory layout of the same convolutions (rounding only)",
        "checkpoint_every": "when the training state is saved; a resumed run continues bit-identically",
        "processes": "data-parallel ranks split one global batch (duplus.train.distributed; reduction order only)",
        "log_every": "how often train_log.csv gets a row (the loss is summed on the device in between)",
    },
    "inference": {
        "sw_batch_size": "windows per forward pass; each window is predicted on its own (rounding only)",
        "channels_last": "the memory layout of the same convolutions (rounding only)",
        "blend_buffer_mb": "float32 or float16 blending buffer: probabilities round at about 1e-3, so a mask "
                           "changes only where one lies that close to the threshold",
    },
    "prompts": {
        "batch_size": "texts per encoder pass; padding is masked out of every text's embedding",
    },
    "lora": {
        "checkpoint_every": "when each training's state is saved; a resumed run continues bit-identically",
    },
}

# Settings that choose which cases a stage covers, not any case's numbers: the stage depends on
# them (its outputs list other cases), a per-case resume journal does not.
CASE_SELECTION: dict[str, tuple[str, ...]] = {
    "evaluate": ("split", "max_cases_per_dataset"),
}


def results_only(name: str, section: Mapping[str, Any] | None, per_case: bool = False) -> dict[str, Any]:
    """A copy of config section ``name`` (as written, or with its defaults resolved) less its ``SPEED_ONLY`` keys,
    and with ``per_case`` its ``CASE_SELECTION`` keys too: what a stage's (or one case's) results depend on."""
    dropped = set(SPEED_ONLY.get(name, ())) | (set(CASE_SELECTION.get(name, ())) if per_case else set())
    return {key: copy.deepcopy(value) for key, value in (section or {}).items() if key not in dropped}


def _section(config: Mapping[str, Any], name: str) -> Any:
    value = config.get(name)
    return results_only(name, value) if isinstance(value, dict) else copy.deepcopy(value)


def _sections(config: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {name: _section(config, name) for name in names}


def _demo_size(name: str, config: Mapping[str, Any]) -> Any:
    """The one ``demo`` key a demo dataset's size comes from (``duplus.demo.generate``)."""
    key = "headneck_patients" if name == "demo_headneck_pet" else "cases_per_center"
    return (config.get("demo") or {}).get(key)


def _is_demo(name: str, config: Mapping[str, Any]) -> bool:
    from duplus.data.registry import builtin_datasets

    settings = (config.get("datasets") or {}).get(name) or {}
    builtin = builtin_datasets().get(name)
    return not settings.get("kind") and builtin is not None and builtin.kind == "demo"


# Settings of a user dataset that only name its classes: tracked by the classes they resolve to.
_NAMING_KEYS = ("labels", "classes")


def _as_written(name: str, config: Mapping[str, Any]) -> Any:
    settings = copy.deepcopy((config.get("datasets") or {}).get(name))
    if isinstance(settings, dict) and not settings.get("root"):
        # Files outside the root concern only data read in place; the schema fills the key in for
        # every dataset, and a downloaded or generated one must not rerun for it.
        settings.pop("allow_outside_root", None)
    return settings


def _dataset_meaning(name: str, config: Mapping[str, Any]) -> Any:
    """A dataset's settings as what they mean: labels by the classes they resolve to (``Liver`` and
    ``liver``, ``liver tumour`` and ``hepatic tumor`` alike, a ``0: background`` entry nothing), its
    declared classes by name, parent and prompt, its region in lower case. A built-in dataset's
    settings are taken as written."""
    settings = _as_written(name, config)
    if not isinstance(settings, dict) or not settings.get("kind"):
        return settings
    from duplus.data.registry import declared_by, get_dataset

    spec = get_dataset(name, config)
    settings["labels"] = {str(k): v for k, v in sorted(spec.labels.items())}
    settings["region"] = spec.region
    declared = declared_by(name, config)
    if declared:
        settings["classes"] = {info.name: {"parent": info.parent, "prompt": info.prompt} for info in declared}
    else:
        settings.pop("classes", None)
    return settings


def _dataset_files(name: str, config: Mapping[str, Any]) -> Any:
    """What a dataset's download depends on: its settings less those that name classes."""
    settings = _as_written(name, config)
    if isinstance(settings, dict):
        for key in _NAMING_KEYS:
            settings.pop(key, None)
    return settings


def stage_settings(stage: str, config: Mapping[str, Any], **wildcards: str) -> dict[str, Any]:
    """The settings ``stage`` depends on (``dataset=`` / ``center=`` for per-dataset / per-center jobs).

    Keys come sorted at every level: Snakemake compares params by their text, and a merged
    ``--configfile`` puts the keys it sets first, so restating a value (``pretrain.batch_size: 2``)
    would otherwise rerun pretraining and everything after it.
    """
    return _ordered(_settings(stage, config, **wildcards))


def _ordered(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _ordered(value[key]) for key in sorted(value, key=str)}
    if isinstance(value, list):
        return [_ordered(item) for item in value]  # list order means something; only mappings are sorted
    return value


def _settings(stage: str, config: Mapping[str, Any], **wildcards: str) -> dict[str, Any]:
    datasets = config.get("datasets") or {}
    if stage == "download":
        name = wildcards["dataset"]
        demo = _is_demo(name, config)  # generated phantoms depend on the seed and their own size key
        return {"dataset": _dataset_files(name, config), "demo": _demo_size(name, config) if demo else None,
                "seed": config.get("seed") if demo else None}
    if stage == "preprocess":
        return {"dataset": _dataset_meaning(wildcards["dataset"], config), **_sections(config, "seed", "preprocess")}
    if stage == "cache_prompts":
        # The prompts are built from every dataset's classes, wording and modality.
        return {"datasets": {name: _dataset_meaning(name, config) for name in datasets}, **_sections(config, "prompts")}
    if stage == "universal_pretrain":
        return _sections(config, "seed", "model", "pretrain")
    if stage == "baseline_train":
        return _sections(config, "seed", "model", "pretrain", "baseline")
    if stage in ("evaluate", "baseline_evaluate"):
        return _sections(config, "inference", "evaluate")
    if stage == "lora_center":
        lora = _section(config, "lora") or {}
        center = (lora.pop("centers", None) or {}).get(wildcards["center"])
        # LoRA scores Dice on the center's whole test split: no evaluate setting changes its numbers.
        return {"center": center, "lora": lora, **_sections(config, "seed", "inference")}
    if stage == "prognosis":
        # Of the inference settings, the tumour masks use only the threshold.
        threshold = (config.get("inference") or {}).get("threshold")
        settings = {**_sections(config, "seed", "prognosis"), "inference_threshold": threshold}
        # The endpoint only names Table 3: the report depends on it, the stage's numbers do not.
        if isinstance(settings["prognosis"], dict):
            settings["prognosis"].pop("endpoint", None)
        return settings
    if stage == "report":
        return {**_sections(config, "report"), "prognosis_endpoint": (config.get("prognosis") or {}).get("endpoint")}
    raise KeyError(f"no tracked settings for stage '{stage}'")

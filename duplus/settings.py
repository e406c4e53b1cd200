"""Typed, read-only settings of each config section, with the defaults of schemas/config.schema.yaml.

The schema is the one place a default is stated: ``Settings.of(config)`` fills them in as Snakemake's ``validate`` does.
"""

from __future__ import annotations

import copy
import functools
import sys
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, MutableMapping

from duplus.errors import ConfigError

# The schema lives at the top of the checkout, beside the Snakefile that validates with it. The library
# always runs from a checkout: `make venv` installs it editable (pip install -e), and the Snakefile puts
# the checkout on every job's path (envs/duplus.yaml does not install it), so no copy of the schema is
# packaged that could drift from the one the pipeline validates with.
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


@functools.cache
def schema() -> dict[str, Any]:
    """The config schema (read once); every caller gets the same object, which nothing may change."""
    import yaml

    if not SCHEMA_PATH.is_file():
        raise ConfigError(f"{SCHEMA_PATH}: config schema not found; duplus runs from its checkout "
                          "(pip install -e . in it, as `make venv` does)")
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def schema_default(*key: str) -> Any:
    """The schema's default of the setting at dotted ``key`` (``schema_default("evaluate", "nsd_tolerance_mm")``),
    for a function's default argument; code that has the config reads ``Settings.of(config)`` instead."""
    node = schema()
    for name in key:
        node = node["properties"][name]
    return copy.deepcopy(node["default"])


@functools.cache
def _validator_class() -> Any:
    """Draft 2020-12 with ``properties`` that fill in each absent property's default first, as Snakemake's
    ``validate`` does (the jsonschema FAQ's recipe), so nested objects defaulted to ``{}`` get their own defaults."""
    from jsonschema import Draft202012Validator, validators

    validate_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Mapping[str, Any], instance: Any, subschema: Any) -> Any:
        if isinstance(instance, dict):
            for name, property_schema in properties.items():
                if "default" in property_schema:
                    # A copy: Snakemake reads the schema anew per call, this module keeps one.
                    instance.setdefault(name, copy.deepcopy(property_schema["default"]))
        yield from validate_properties(validator, properties, instance, subschema)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})


def _problems(config: dict[str, Any], rules: Mapping[str, Any]) -> list[str]:
    errors = sorted(_validator_class()(rules).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'.'.join(str(p) for p in error.absolute_path) or 'config'}: {error.message}" for error in errors]


def with_defaults(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``config`` with the schema's defaults filled in at every level, as Snakemake's ``validate``
    gives it to the pipeline; raises one ``ConfigError`` listing every value the schema refuses, by key."""
    filled = copy.deepcopy(dict(config or {}))
    problems = _problems(filled, schema())
    if problems:
        raise ConfigError("config: " + "; ".join(problems))
    return filled


@functools.cache
def _sections_schema() -> dict[str, Any]:
    """The schema with ``datasets`` taken as any mapping: the dataset registry and ``duplus.configcheck``
    check datasets (with their fixes); the sections' settings must not wait for that."""
    whole = schema()
    datasets = {"type": "object", "default": whole["properties"]["datasets"]["default"]}
    return {**whole, "properties": {**whole["properties"], "datasets": datasets}}


REMOVABLE = (("datasets",), ("lora", "centers"), ("pretrain", "exclude_centers"))


def drop_removed_entries(config: MutableMapping[str, Any]) -> list[str]:
    """Delete, in place, the entries of ``REMOVABLE`` mappings set to null; returns their dotted keys.

    A ``--configfile`` is merged into ``config.yaml`` and cannot delete keys; ``datasets:
    {demo_abdomen_mri: null}`` is how it takes a dataset (or a LoRA center, a held-out center list)
    out of the run.
    """
    removed = []
    for path in REMOVABLE:
        section: Any = config
        for key in path:
            section = section.get(key) if isinstance(section, MutableMapping) else None
        if isinstance(section, MutableMapping):
            for name in [k for k, v in section.items() if v is None]:
                del section[name]
                removed.append(".".join((*path, str(name))))
    return removed


# Field names are listed here, their defaults only in the schema (tests/test_settings.py checks both).
@dataclass(frozen=True)
class Paths:
    raw: str
    preprocessed: str
    results: str
    logs: str


@dataclass(frozen=True)
class Demo:
    cases_per_center: int
    headneck_patients: int


@dataclass(frozen=True)
class Preprocess:
    spacing: tuple[float, ...]
    ct_window: tuple[float, ...]
    percentiles: tuple[float, ...]
    crop_foreground: bool
    test_fraction: float


@dataclass(frozen=True)
class Prompts:
    encoder: str
    source: str
    pooling: str
    batch_size: int
    paraphrases: bool


@dataclass(frozen=True)
class Model:
    preset: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Pretrain:
    steps: int
    batch_size: int
    patch_size: tuple[int, ...]
    lr: float
    weight_decay: float
    warmup_steps: int
    lr_cycles: int
    ema_decay: float
    grad_accum: int
    amp: str
    checkpoint_every: int
    log_every: int
    num_workers: int
    foreground_ratio: float
    dataset_weights: dict[str, float]
    exclude_centers: dict[str, list[str]]
    compile: bool
    channels_last: bool
    processes: int | None


@dataclass(frozen=True)
class Inference:
    overlap: float
    sw_batch_size: int | None
    channels_last: bool | None
    blend: str
    threshold: float
    blend_buffer_mb: float
    boundary_budget_mb: float


@dataclass(frozen=True)
class Evaluate:
    split: str
    nsd_tolerance_mm: float
    max_cases_per_dataset: int


@dataclass(frozen=True)
class Baseline:
    enabled: bool
    steps: int | None
    lr: float | None


@dataclass(frozen=True)
class Lora:
    enabled: bool
    centers: dict[str, dict[str, Any]]
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    text_projection: bool
    modules_to_save: tuple[str, ...]
    steps: int
    batch_size: int
    lr: float
    full_finetune_lr: float
    checkpoint_every: int


@dataclass(frozen=True)
class Ehr:
    table: str | None
    id: str
    time: str
    event: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    binary: tuple[str, ...]
    allow_unmatched: bool
    center: str | None
    treatments: tuple[str, ...]
    columns: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class PrognosisEvaluation:
    bootstrap: int
    horizons: tuple[float, ...] | None
    calibration_horizon: float | None


@dataclass(frozen=True)
class PrognosisBaselines:
    cox_alpha: float
    rsf_trees: int
    rsf_min_leaf: int


@dataclass(frozen=True)
class PrognosisText:
    encoding: str


@dataclass(frozen=True)
class Prognosis:
    enabled: bool
    dataset: str | tuple[str, ...] | None
    endpoint: str
    ehr: Ehr
    tumour_mask: str
    folds: int
    split: str
    evaluation: PrognosisEvaluation
    baselines: PrognosisBaselines
    merge: tuple[str, ...]
    text: PrognosisText
    epochs: int
    lr: float
    hidden: int
    time_bins: int


@dataclass(frozen=True)
class Resources:
    gpus: int
    gpu_model: str | None
    jobs: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Report:
    published: bool


@dataclass(frozen=True)
class Settings:
    """The whole config, typed: ``Settings.of(config).inference.overlap``. ``datasets`` stays the mapping as
    written (less entries set to null); ``duplus.data.registry`` reads it."""

    seed: int
    device: str
    deterministic: bool
    paths: Paths
    datasets: dict[str, Any]
    demo: Demo
    preprocess: Preprocess
    prompts: Prompts
    model: Model
    pretrain: Pretrain
    inference: Inference
    evaluate: Evaluate
    baseline: Baseline
    lora: Lora
    prognosis: Prognosis
    resources: Resources
    report: Report

    @classmethod
    def of(cls, config: Mapping[str, Any] | Settings | None) -> Settings:
        """The settings ``config`` gives, the schema's default for every key it leaves out.

        ``config`` may be partial or empty (``duplus segment`` without a config.yaml, a test's few keys);
        the pipeline's is already filled. Entries set to null in the mappings a ``--configfile`` removes
        from (``REMOVABLE``) are left out, as the Snakefile does. Raises one
        ``ConfigError`` naming every key whose value the schema refuses (a wrong type, an unknown key).
        """
        if isinstance(config, Settings):
            return config
        return _build(cls, filled_config(config), "")


def filled_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``config`` with the schema's defaults, its values as written (lists, an int for a number):
    for records whose text is hashed or compared, which must read as the pipeline's validated config did.
    ``Settings.of`` types this; raises as it does."""
    filled = copy.deepcopy(dict(config or {}))
    drop_removed_entries(filled)
    problems = _problems(filled, _sections_schema())
    if problems:
        raise ConfigError("config: " + "; ".join(problems))
    return filled


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls, vars(sys.modules[__name__]))
    return cls(**{f.name: _typed(hints[f.name], values[f.name], f"{where}{f.name}") for f in fields(cls)})


def _typed(hint: Any, value: Any, key: str) -> Any:
    """``value`` (valid by the schema) as ``hint`` says: lists as tuples, numbers as floats, sections as objects."""
    if value is None:
        return None
    if is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arms = [arm for arm in typing.get_args(hint) if arm is not type(None)]
        listed = [arm for arm in arms if typing.get_origin(arm) is tuple]
        if isinstance(value, list) and listed:
            return _typed(listed[0], value, key)
        return _typed(next(arm for arm in arms if typing.get_origin(arm) is not tuple), value, key)
    if origin is tuple:
        return tuple(_typed(typing.get_args(hint)[0], item, key) for item in value)
    if origin is dict:
        return copy.deepcopy(dict(value))
    if hint is float:
        return float(value)
    if hint in (int, bool, str) and not isinstance(value, hint):
        # The schema has checked the value; this is a field whose type and the schema's disagree.
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def section_dict(settings: Any) -> dict[str, Any]:
    """A section's settings as a plain mapping (tuples as lists), as the schema writes them."""
    def plain(value: Any) -> Any:
        if is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, tuple):
            return [plain(item) for item in value]
        return copy.deepcopy(value)

    return plain(settings)

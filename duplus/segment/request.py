"""What a `duplus segment` run asks for, resolved and checked before any scan is read or any model loads:
the classes and their prompt texts, modality, region, sequence, device, and the run's default files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from duplus.errors import ConfigError

log = logging.getLogger("duplus.segment")


@dataclass(frozen=True)
class Request:
    """The prompts and options of a run, resolved: the same for every scan it segments."""

    weights: str
    prompt_cache: str
    modality: str  # as the model names it: CT, MRI or PET
    device: Any  # a torch.device
    resolved: list[Any]  # one ResolvedPrompt per class, a dataset's classes first
    region: str
    sequence: str | None
    context_text: str
    sha256: str | None
    adapter: str | None
    multilabel: bool
    config: dict[str, Any]
    threshold: float | None
    declared: tuple[str, ...] = ()  # the classes of the user's own that the weights (or adapter) record

    @property
    def names(self) -> list[str]:
        """Class names, as the outputs are named: the canonical class, or the phrase as typed when it has none."""
        return [item.canonical or item.phrase for item in self.resolved]

    @property
    def texts(self) -> list[str]:
        """The target prompt (T2) of each class."""
        return [item.text for item in self.resolved]


def resolve_request(
    prompts: str | Sequence[str] | None,
    modality: str,
    *,
    region: str | None = None,
    sequence: str | None = None,
    weights: str | None = None,
    sha256: str | None = None,
    adapter: str | None = None,
    dataset_classes: str | None = None,
    multilabel: bool = False,
    device: str = "auto",
    prompt_cache: str | None = None,
    config: Mapping[str, Any] | None = None,
    threshold: float | None = None,
) -> Request:
    """The run ``prompts`` and the options ask for; raises ``ConfigError`` naming the option at fault.

    ``weights`` and ``prompt_cache`` default to the files of the pipeline run ``config`` describes
    (:func:`default_paths`); ``region`` to the first known class's region.
    """
    from duplus.model import MODALITIES, modality_index
    from duplus.prompts.templates import context_prompt
    from duplus.runtime import resolve_device
    from duplus.segment.checks import check_dataset_modality, check_sequence, warn_if_unknown_region
    from duplus.segment.knowledge import class_records, use_model_classes

    config = dict(config or {})
    default_weights, default_cache = default_paths(config)  # the run's own files unless given
    if weights is None and not Path(default_weights).is_file():
        raise ConfigError(f"{default_weights}: no trained model there (the default of a run in {Path.cwd()}); "
                          "give --weights (and --prompt-cache), or --config of the run that trained it")
    if threshold is not None and not 0.0 < float(threshold) < 1.0:
        raise ConfigError(f"--threshold {threshold}: a sigmoid threshold lies strictly between 0 and 1")
    modality = MODALITIES[modality_index(modality)]
    resolved_device = resolve_device(device)  # a misspelt --device fails here, not after the scan is read
    check_sequence(sequence, modality)
    spec_region, classes_of_dataset = None, []
    if dataset_classes:
        from duplus.data.registry import get_dataset

        try:
            spec = get_dataset(dataset_classes, config)
        except ConfigError as error:
            raise ConfigError(f"--dataset-classes {dataset_classes}: {error} (a dataset of your own is read from "
                              "--config, default ./config.yaml: give the config that declares it)") from None
        check_dataset_modality(dataset_classes, spec.modality, modality)
        classes_of_dataset = list(dict.fromkeys(spec.labels[k] for k in sorted(spec.labels)))
        spec_region, sequence = spec.region, sequence or spec.sequence
    if region:
        # As the registry spells regions (lower case), so the context prompt is the one trained on.
        region = " ".join(region.split()).lower()
        warn_if_unknown_region(region, config)
    # Last before the prompts resolve (a registry lookup declares the config's classes alone): the
    # classes the weights recorded, and the config's own, name a prompt with the sentence training used.
    declared = use_model_classes(class_records(str(weights or default_weights), adapter), config)
    resolved = resolve_prompts(prompts, modality, sequence, classes_of_dataset)
    if not region:
        region = " ".join(default_region(resolved, spec_region).split()).lower()
    sequence = " ".join(sequence.split()) if sequence else sequence
    return Request(
        weights=str(weights or default_weights), prompt_cache=str(prompt_cache or default_cache), modality=modality,
        device=resolved_device, resolved=resolved, region=region, sequence=sequence,
        context_text=context_prompt(modality, region, sequence), sha256=sha256, adapter=adapter,
        multilabel=bool(multilabel), config=config, threshold=threshold, declared=tuple(declared),
    )


def default_paths(config: Mapping[str, Any]) -> tuple[str, str]:
    """(weights, prompt cache) of the pipeline run that ``config`` describes."""
    from duplus.results_layout import ResultsLayout
    from duplus.settings import Settings

    settings = Settings.of(config)
    results = ResultsLayout(settings.paths.results)
    return str(results.model), str(results.prompt_cache(settings.prompts.encoder))


def load_config(path: str | None) -> dict[str, Any]:
    """The YAML config at ``path``; ``./config.yaml`` when not given and present; else empty."""
    import yaml

    candidate = Path(path) if path else Path("config.yaml")
    if not candidate.is_file():
        if path:
            raise ConfigError(f"{path}: config file not found")
        return {}
    try:
        data = yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{candidate}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{candidate}: expected a mapping at the top level")
    return data


def resolve_prompts(prompts: str | Sequence[str] | None, modality: str, sequence: str | None,
                    dataset_classes: Sequence[str] = ()) -> list[Any]:
    """(phrase, canonical class or None, T2 text) per requested class, dataset classes first."""
    from duplus.prompts.catalog import resolve_free_text

    phrases = list(dataset_classes)
    if prompts:
        phrases.extend([prompts] if isinstance(prompts, str) else prompts)
    resolved = resolve_free_text(phrases if phrases else (prompts or ""), modality, sequence)
    # Two phrases with one prompt text ("liver" and "hepatic", or a dataset class asked for again)
    # would give the same mask twice: keep the first.
    unique: dict[str, Any] = {}
    for item in resolved:
        if item.text in unique:
            log.info("%r asks for the same class as %r; segmented once", item.phrase, unique[item.text].phrase)
        else:
            unique[item.text] = item
    return list(unique.values())


def default_region(resolved: list[Any], spec_region: str | None) -> str:
    if spec_region:
        return spec_region
    from duplus.data.taxonomy import region_of

    for item in resolved:
        if item.canonical is not None:
            return region_of(item.canonical)
    raise ConfigError("no class prompt is a known class, so the body region is unknown: correct the class names "
                      "warned about above (`duplus list-classes`), or give --region (e.g. abdomen) to segment "
                      "them as typed")

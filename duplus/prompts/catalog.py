"""Which prompts a run needs (from its enabled datasets) and how free-text class prompts become T2 text.

The catalog is the single list the prompt cache is built from, so training never meets a missing text.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, NamedTuple, Protocol, Sequence

from duplus.errors import PromptError
from duplus.prompts.templates import MODALITY_PHRASES, context_prompt, normalize_modality, target_prompts
from duplus.settings import Settings

log = logging.getLogger(__name__)

BACKGROUND = "background"
# Free-text prompts are split on commas, semicolons and line breaks: "liver, hepatic tumour".
_SPLIT = re.compile(r"[,;\n]+")


class DatasetLike(Protocol):
    """The fields of ``duplus.data.registry.DatasetSpec`` that prompts depend on."""

    name: str
    modality: str
    sequence: str | None
    region: str
    labels: dict[int, str]


class ResolvedPrompt(NamedTuple):
    """One free-text class prompt: what the user typed, its canonical class (or None) and its T2 text."""

    phrase: str
    canonical: str | None
    text: str


def dataset_classes(spec: DatasetLike) -> list[str]:
    """Class names a dataset annotates, in label-id order, without background or repeats."""
    names = []
    for label_id, name in sorted((int(k), v) for k, v in dict(spec.labels).items()):
        if label_id == 0 or not name or name.strip().lower() == BACKGROUND:
            continue
        names.append(" ".join(name.split()))
    return list(dict.fromkeys(names))


def _targets(modality: str, name: str, sequence: str | None, paraphrases: bool) -> list[str]:
    texts = target_prompts(modality, name, sequence)
    return texts if paraphrases else texts[:1]


def prompts_for_datasets(datasets: Sequence[DatasetLike], paraphrases: bool = True) -> list[str]:
    """Sorted unique texts for ``datasets``: their own T1 and T2 prompts plus cross-modality ones.

    Cross-modality prompts let a user ask any modality for any class of the run without a cache
    miss: every scan kind (each dataset's modality and sequence, and plain CT, MRI and PET) is
    paired with every region (T1) and every class (T2) of the run.
    """
    texts: set[str] = set()
    scan_kinds: set[tuple[str, str | None]] = {(m, None) for m in MODALITY_PHRASES}
    regions: set[str] = set()
    classes: set[str] = set()
    for spec in datasets:
        try:
            modality = normalize_modality(spec.modality)
        except PromptError as error:
            raise PromptError(f"dataset {spec.name!r}: {error}") from None
        sequence = spec.sequence if modality == "MRI" and spec.sequence else None
        scan_kinds.add((modality, sequence))
        regions.add(spec.region)
        texts.add(context_prompt(modality, spec.region, sequence))
        for name in dataset_classes(spec):
            classes.add(name)
            texts.update(_targets(modality, name, sequence, paraphrases))
    for modality, sequence in sorted(scan_kinds, key=lambda k: (k[0], k[1] or "")):
        texts.update(context_prompt(modality, region, sequence) for region in regions)
        for name in classes:
            texts.update(_targets(modality, name, sequence, paraphrases))
    return sorted(texts)


def prompts_for_config(config: dict[str, Any], datasets: Sequence[DatasetLike] | None = None) -> list[str]:
    """Every text the run configured in ``config`` needs (see ``prompts_for_datasets``).

    ``datasets`` defaults to ``duplus.data.registry.enabled_datasets(config)``; T2 prompts are all
    five paraphrases when ``prompts.paraphrases`` is true, else only the canonical one.
    """
    if datasets is None:
        from duplus.data.registry import enabled_datasets

        datasets = enabled_datasets(config)
    paraphrases = Settings.of(config).prompts.paraphrases
    return prompts_for_datasets(list(datasets), paraphrases=paraphrases)


def split_free_text(prompts: str | Iterable[str]) -> list[str]:
    """Class phrases of a free-text prompt, in order, without blanks or repeats."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    phrases: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise PromptError(f"class prompt {item!r} is not text")
        phrases.extend(" ".join(part.split()) for part in _SPLIT.split(item))
    phrases = [p for p in phrases if p]
    if not phrases:
        raise PromptError(f"no class named in the prompt {prompts!r}; give e.g. 'liver, liver tumor'")
    return list(dict.fromkeys(phrases))


def resolve_free_text(prompts: str | Iterable[str], modality: str, sequence: str | None = None) -> list[ResolvedPrompt]:
    """Map free-text class phrases to canonical classes and their canonical T2 prompt.

    "liver, hepatic tumour" on CT gives ("liver", "liver", "A computed tomography scan of a liver.")
    and ("hepatic tumour", "liver tumor", "A computed tomography scan of a liver tumor."). A phrase
    the taxonomy does not know keeps the user's words as the class name (the text encoder can
    still place it) and is logged as a warning.
    """
    from duplus.data.taxonomy import canonical_name, did_you_mean

    resolved = []
    for phrase in split_free_text(prompts):
        canonical = canonical_name(phrase)
        if canonical is None:
            log.warning("class prompt %r is not a known class or synonym%s (see `duplus list-classes`); using the "
                        "words as typed", phrase, did_you_mean(phrase))
        text = target_prompts(modality, canonical or phrase, sequence)[0]
        resolved.append(ResolvedPrompt(phrase, canonical, text))
    return resolved

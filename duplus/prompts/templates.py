"""Prompt templates: the T1 context prompt of a scan and the five T2 target paraphrases of a class.

Strings follow the paper's code literally ("a" before every class name). The functions are pure
but for the taxonomy lookups of :func:`class_wording` and :func:`taxonomy_parents`: a class the
run's config declares may bring its own wording.
"""

from __future__ import annotations

import re
from typing import Sequence

from duplus.errors import DuplusError, PromptError

MODALITY_PHRASES = {
    "CT": "computed tomography scan",
    "MRI": "Magnetic Resonance Imaging scan",
    "PET": "positron emission tomography scan",
}

# Spellings users and dataset.json files use for the three modalities.
_MODALITY_ALIASES = {
    "ct": "CT",
    "mri": "MRI",
    "mr": "MRI",
    "pet": "PET",
}

# "T2", "t2w", "T2-weighted", "T1 in-phase", "T1_out-of-phase" -> weighting + remainder.
_WEIGHTED = re.compile(r"^(t1|t2|pd)(?:[- ]?w(?:eighted)?)?(?:[\s_-]+(?P<rest>.+))?$", re.IGNORECASE)

# The paper's T2 paraphrases; index 0 is the canonical one used at inference.
TARGET_TEMPLATES: tuple[str, ...] = (
    "A {mod} of a {organ}.",
    "There is {organ} in this {mod}.",
    "{organ} observed in {mod} imaging.",
    "{mod} revealing a {organ}.",
    "Identification of a {organ} through {mod}.",
)
CONTEXT_TEMPLATE = "A {mod} of the {region}"
N_PARAPHRASES = len(TARGET_TEMPLATES)


def normalize_modality(modality: str) -> str:
    """Return "CT", "MRI" or "PET" for any accepted spelling; raise ``PromptError`` otherwise."""
    key = str(modality).strip().lower()
    if key not in _MODALITY_ALIASES:
        raise PromptError(f"unknown modality {modality!r}: expected one of CT, MRI, PET (MR is read as MRI)")
    return _MODALITY_ALIASES[key]


def _sequence_phrase(sequence: str) -> str:
    match = _WEIGHTED.match(sequence.strip())
    if match is None:
        # Sequences without a weighting ("cine", "FLAIR", "DWI") are named as given.
        return " ".join(sequence.split())
    weighting = f"{match.group(1).upper()}-weighted"
    rest = match.group("rest")
    return f"{weighting} {' '.join(rest.split())}" if rest else weighting


def modality_phrase(modality: str, sequence: str | None = None) -> str:
    """How a scan is named inside a prompt, e.g. "T2-weighted Magnetic Resonance Imaging scan".

    ``sequence`` only qualifies MRI; for CT and PET it is ignored because a CT or PET volume has
    no weighting and the paper's strings carry none.
    """
    canonical = normalize_modality(modality)
    phrase = MODALITY_PHRASES[canonical]
    if canonical == "MRI" and sequence is not None and str(sequence).strip():
        return f"{_sequence_phrase(str(sequence))} {phrase}"
    return phrase


def _clean(text: str, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"empty {what} {text!r}: a prompt needs a non-empty {what}")
    return " ".join(text.split())


def _capitalize_first(text: str) -> str:
    # str.capitalize() would lower-case the rest ("T2-weighted" -> "T2-Weighted"-like damage).
    return text[:1].upper() + text[1:]


def context_prompt(modality: str, region: str, sequence: str | None = None) -> str:
    """T1 prompt of a scan, e.g. "A computed tomography scan of the abdomen" (no final period)."""
    mod = modality_phrase(modality, sequence)
    return CONTEXT_TEMPLATE.format(mod=mod, region=_clean(region, "region"))


def hierarchical_phrase(class_name: str, parents: Sequence[str]) -> str:
    """Class name placed in its anatomy, nearest parent first: "liver tumor in the liver of the abdomen"."""
    name = _clean(class_name, "class name")
    chain = [" ".join(p.split()) for p in parents if p and p.strip()]
    chain = [p for p in chain if p != name]
    if not chain:
        return name
    text = f"{name} in the {chain[0]}"
    for parent in chain[1:]:
        text += f" of the {parent}"
    return text


def target_prompts(
    modality: str,
    class_name: str,
    sequence: str | None = None,
    hierarchical: bool = False,
    parents: Sequence[str] | None = None,
) -> list[str]:
    """The five T2 paraphrases of ``class_name``; index 0 is "A computed tomography scan of a liver tumor.".

    With ``hierarchical=True`` the class is named with its anatomy (region > organ > lesion), e.g.
    "A computed tomography scan of a liver tumor in the liver of the abdomen.". ``parents``
    (nearest first) defaults to the taxonomy's parents of the class; an unknown class keeps the
    plain name.
    """
    mod = modality_phrase(modality, sequence)
    name = _clean(class_name, "class name")
    wording = class_wording(name)
    if "{scan}" in wording:
        # A declared class's own sentence: one text, in every paraphrase slot, so that sampling a
        # paraphrase and taking the canonical one give the same prompt.
        return [_capitalize_first(_clean(wording.replace("{scan}", mod), "prompt"))] * len(TARGET_TEMPLATES)
    organ = wording
    if hierarchical:
        chain = list(parents) if parents is not None else taxonomy_parents(name)
        organ = hierarchical_phrase(organ, chain)
    texts = [template.format(mod=mod, organ=organ) for template in TARGET_TEMPLATES]
    return [_capitalize_first(text) for text in texts]


def target_prompt(modality: str, class_name: str, sequence: str | None = None) -> str:
    """The canonical T2 prompt (paraphrase 0), the one used at inference."""
    return target_prompts(modality, class_name, sequence)[0]


def class_wording(class_name: str) -> str:
    """What stands for the class in its target prompts: the class name itself, or, for a class the
    config declares with ``prompt``, its words ("left caudate nucleus") or its sentence with
    ``{scan}`` where the scan's name goes ("A {scan} showing the left caudate nucleus.").
    """
    from duplus.data import taxonomy

    declared = {info.name: info for info in getattr(taxonomy, "declared_classes", list)() if info.prompt}
    if not declared:
        return class_name  # built-in classes are named as they are
    name = taxonomy.canonical_name(class_name)
    if name in declared:
        return " ".join(str(declared[name].prompt).split())
    return class_name


def taxonomy_parents(class_name: str) -> list[str]:
    """Anatomy of a class from ``duplus.data.taxonomy``, nearest first, ending with its body region.

    ``parents("liver tumor") == ["liver"]`` and region "abdomen" give ``["liver", "abdomen"]``;
    an unknown class gives ``[]``.
    """
    from duplus.data import taxonomy

    try:
        chain = list(taxonomy.parents(class_name))
        region_of = getattr(taxonomy, "region_of", None)
        region = region_of(class_name) if region_of is not None else None
    except (DuplusError, KeyError, ValueError, LookupError):
        return []
    if region and region not in chain:
        chain.append(region)
    return chain

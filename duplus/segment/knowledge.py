"""What a model was trained on, from its sidecar (``model.json``): which classes, in which modality and
body region. A prompt outside it is zero-shot: the text encoder can place it, but no training mask
taught the network what it looks like, so `duplus segment` says so instead of returning a silent empty mask.

The sidecar of a pretraining run records ``classes`` per dataset; each dataset's modality and region
come from the registry (built-in or declared in the config). Where a sidecar records no classes
(an older or hand-made model), nothing is claimed.
"""

from __future__ import annotations

from typing import Any, Mapping


def trained_on(sidecar: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One entry per training dataset: ``dataset``, ``modality``, ``region`` (None when unknown), ``classes``."""
    from duplus.data.registry import get_dataset

    classes = sidecar.get("classes")
    if not isinstance(classes, Mapping):
        return []
    entries = []
    for dataset, names in classes.items():
        try:
            spec = get_dataset(str(dataset), dict(config or {}))
            modality, region = spec.modality, spec.region
        except Exception:  # noqa: BLE001 - a dataset no longer declared: its classes still count, unplaced
            modality, region = None, None
        entries.append({"dataset": str(dataset), "modality": modality, "region": region,
                        "classes": [str(name) for name in names or []]})
    return entries


def _pairs(entries: list[dict[str, Any]]) -> str:
    return ", ".join(sorted({f"{e['modality']} {e['region']}" for e in entries if e["modality"]})) or "unknown scans"


def zero_shot_notes(entries: list[dict[str, Any]], modality: str, region: str, classes: list[str]) -> list[str]:
    """One line per prompt the model never trained on: a class it never saw, or saw only in other
    modality-region pairs; and one when it never saw this modality and region at all."""
    if not entries:
        return []
    notes = []
    placed = [e for e in entries if e["modality"]]
    here = [e for e in placed if e["modality"] == modality and e["region"] == region]
    if placed and not here:
        notes.append(f"the model was never trained on {modality} {region} scans (it was on: {_pairs(placed)}): every "
                     "class is zero-shot here")
    for name in classes:
        seen = [e for e in entries if name.lower() in (c.lower() for c in e["classes"])]
        if not seen:
            notes.append(f"'{name}': the model was never trained on this class: zero-shot, expect a poor or empty mask")
        elif here and not any(e in here for e in seen):
            notes.append(f"'{name}': trained only on {_pairs(seen)}, not on {modality} {region}: zero-shot here")
    return notes


def format_trained_on(entries: list[dict[str, Any]], weights: str) -> str:
    """The table `duplus list-classes --weights W` prints."""
    if not entries:
        return f"{weights}: its sidecar records no training classes (nothing is known of what it was trained on)"
    lines = [f"{weights} was trained on:", f"{'dataset':<24} {'modality':<8} {'region':<16} classes"]
    for e in entries:
        lines.append(f"{e['dataset']:<24} {e['modality'] or '?':<8} {e['region'] or '?':<16} {', '.join(e['classes'])}")
    return "\n".join(lines)

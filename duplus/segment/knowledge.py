"""What a model was trained on, from its sidecar (``model.json``): which classes, in which modality and
body region, and the classes of a config's own it learnt. A prompt outside it is zero-shot, so `duplus segment` says so.

The sidecar of a pretraining run records ``classes`` and ``dataset_scans`` (modality, region) per
dataset, and ``declared_classes``: each class the run's config declared that the model trained on
(with its declared parents), as :func:`duplus.data.taxonomy.class_record` writes it. A prompt names
those by name or synonym, and gets the sentence it was trained with, from the weights alone; a
center's ``adapter_meta.json`` records the same. Older sidecars lack the keys: their datasets are
placed through the registry (built-in or the config's), their declared classes come from the config,
and where no classes are recorded at all, nothing is claimed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from duplus.errors import ConfigError, DataError, ModelError

log = logging.getLogger("duplus.segment")

RECORDED = "declared_classes"
ADAPTER_META = "adapter_meta.json"


def trained_on(sidecar: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One entry per training dataset: ``dataset``, ``modality``, ``region`` (None when unknown), ``classes``."""
    from duplus.data import taxonomy
    from duplus.data.registry import get_dataset

    classes = sidecar.get("classes")
    if not isinstance(classes, Mapping):
        return []
    scans = sidecar.get("dataset_scans") if isinstance(sidecar.get("dataset_scans"), Mapping) else {}
    entries = []
    # Placing a dataset through the registry declares the config's classes alone: the classes the
    # weights brought (use_model_classes) must stay known for the rest of the process.
    kept = taxonomy.declared_classes()
    try:
        for dataset, names in classes.items():
            recorded = scans.get(dataset)
            if isinstance(recorded, Mapping) and recorded.get("modality"):
                modality, region = str(recorded["modality"]), recorded.get("region")
            else:
                try:
                    spec = get_dataset(str(dataset), dict(config or {}))
                    modality, region = spec.modality, spec.region
                except Exception:  # noqa: BLE001 - a dataset no longer declared: its classes still count, unplaced
                    modality, region = None, None
            entries.append({"dataset": str(dataset), "modality": modality, "region": region,
                            "classes": [str(name) for name in names or []]})
    finally:
        taxonomy.declare_classes(kept)
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


def format_trained_on(entries: list[dict[str, Any]], weights: str, declared: Sequence[Any] = ()) -> str:
    """The table `duplus list-classes --weights W` prints; ``declared``: the classes of a config's own
    its sidecar records (``ClassInfo``), listed below it as such."""
    if not entries:
        lines = [f"{weights}: its sidecar records no training classes (nothing is known of what it was trained on)"]
    else:
        lines = [f"{weights} was trained on:", f"{'dataset':<24} {'modality':<8} {'region':<16} classes"]
        for e in entries:
            lines.append(f"{e['dataset']:<24} {e['modality'] or '?':<8} {e['region'] or '?':<16} "
                         f"{', '.join(e['classes'])}")
    if declared:
        lines += ["", "declared classes (not built in; recorded with the weights, so --prompts may name them, or a "
                      "synonym, without the config):",
                  f"{'class':<24} {'region':<16} {'parent':<20} prompt / synonyms"]
        for info in declared:
            words = [f"prompt: {info.prompt}"] if info.prompt else []
            words += [f"synonyms: {', '.join(info.synonyms)}"] if info.synonyms else []
            lines.append(f"{info.name:<24} {info.region:<16} {info.parent or '-':<20} {'; '.join(words) or '-'}")
    return "\n".join(lines)


def recorded_classes(record: Mapping[str, Any], where: str) -> list[Any]:
    """The declared classes (``ClassInfo``) a sidecar or ``adapter_meta.json`` records; none in an older one.

    ``ModelError`` naming ``where`` and every malformed entry.
    """
    from duplus.data.taxonomy import class_from_record

    entries = record.get(RECORDED)
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ModelError(f"{where}: '{RECORDED}' must be a list of classes, got {type(entries).__name__}")
    classes, problems = [], []
    for index, entry in enumerate(entries):
        try:
            classes.append(class_from_record(entry, f"{RECORDED}[{index}]"))
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise ModelError(f"{where}: " + "; ".join(problems))
    return classes


def adapter_record(adapter: str | Path | None) -> tuple[dict[str, Any], str] | None:
    """(``adapter_meta.json``, its path) of a center's LoRA folder, given as ``results/lora/<center>`` or
    its ``adapter/``; None when there is none (an adapter folder saved by hand)."""
    if not adapter:
        return None
    folder = Path(adapter)
    for path in (folder / ADAPTER_META, folder.parent / ADAPTER_META):
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8")), str(path)
            except (OSError, json.JSONDecodeError) as error:
                raise ModelError(f"{path}: unreadable adapter record ({error})") from None
    return None


def _meaning(info: Any) -> dict[str, Any]:
    """What of a declaration decides a prompt and a mask: synonyms only name it, so they may differ."""
    return {"region": info.region, "parent": info.parent,
            "prompt": " ".join(info.prompt.split()) if info.prompt else None}


def _described(meaning: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {value!r}" if value is not None else f"no {key}" for key, value in meaning.items())


def model_classes(records: Sequence[tuple[Mapping[str, Any], str]], config: Mapping[str, Any] | None
                  ) -> tuple[list[Any], list[str]]:
    """(every declared class a prompt may name, the names of those the weights record).

    ``records``: (sidecar or adapter record, its path) pairs. Classes come from the records and from
    ``config``'s ``datasets.*.classes``; a class both declare must mean the same (region, parent,
    prompt; synonyms add up), else ``ConfigError`` listing every conflict with both declarations. A
    recorded class that cannot join the taxonomy now (a later version made its name built-in) is
    left out with a warning: prompts then name the built-in class.
    """
    from duplus.data.registry import declared_by, declared_class_problems
    from duplus.data.taxonomy import declaration_problems

    recorded: dict[str, tuple[Any, str]] = {}
    problems: list[str] = []
    for record, where in records:
        for info in recorded_classes(record, where):
            if info.name not in recorded:
                recorded[info.name] = (info, where)
                continue
            first, first_where = recorded[info.name]
            if _meaning(first) != _meaning(info):
                problems.append(f"class '{info.name}': {first_where} records it with {_described(_meaning(first))}, "
                                f"{where} with {_described(_meaning(info))}; the adapter belongs to weights that "
                                "declare it the same way")
            recorded[info.name] = (_with_synonyms(first, info.synonyms), first_where)
    usable = [info for info, _ in recorded.values()]
    while found := declaration_problems(usable):  # a class left out may strand its children: again until none is
        for name, problem in found:
            log.warning("class '%s' recorded with the weights (%s) is left out: %s", name, recorded[name][1], problem)
        usable = [info for info in usable if info.name not in {name for name, _ in found}]
    merged = {info.name: info for info in usable}

    config = dict(config or {})
    own, config_problems = declared_class_problems(config)
    problems += [f"the config (--config, default ./config.yaml): {problem}" for problem in config_problems]
    owners = {info.name: dataset for dataset in (config.get("datasets") or {}) for info in declared_by(dataset, config)}
    for info in own:
        if info.name not in merged:
            merged[info.name] = info
            continue
        trained = merged[info.name]
        if _meaning(trained) != _meaning(info):
            problems.append(
                f"class '{info.name}': the config (--config, default ./config.yaml) declares it in "
                f"datasets.{owners.get(info.name, '?')}.classes with {_described(_meaning(info))}, but "
                f"{recorded[info.name][1]} records that the weights were trained with {_described(_meaning(trained))}; "
                "make the config's declaration match the weights', or segment without that config (the weights "
                "bring their own classes)")
        merged[info.name] = _with_synonyms(trained, info.synonyms)
    classes = list(merged.values())
    problems += [f"class '{name}': {problem}" for name, problem in declaration_problems(classes)]
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return classes, [name for name in recorded if name in merged]


def _with_synonyms(info: Any, synonyms: Sequence[str]) -> Any:
    from dataclasses import replace

    from duplus.data.taxonomy import normalized

    known = {normalized(text) for text in (info.name, *info.synonyms)}
    extra = [text for text in synonyms if normalized(text) not in known]
    return replace(info, synonyms=tuple(info.synonyms) + tuple(dict.fromkeys(extra))) if extra else info


def class_records(weights: str, adapter: str | None) -> list[tuple[dict[str, Any], str]]:
    """(record, path) of the weights' sidecar and of an adapter's ``adapter_meta.json``: the classes they record."""
    from duplus.errors import CheckpointError
    from duplus.model import read_sidecar, sidecar_path

    records = []
    try:
        records.append((read_sidecar(weights), str(sidecar_path(weights))))
    except CheckpointError:
        pass  # a missing or broken sidecar is reported, naming the file, when the weights load
    adapted = adapter_record(adapter)
    return records + ([adapted] if adapted else [])


def use_model_classes(records: Sequence[tuple[Mapping[str, Any], str]], config: Mapping[str, Any] | None) -> list[str]:
    """Make the classes of :func:`model_classes` known to the taxonomy; returns the names the weights record."""
    from duplus.data.taxonomy import declare_classes

    classes, recorded = model_classes(records, config)
    declare_classes(classes)
    return recorded

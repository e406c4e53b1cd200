"""Checks of the merged config that run when the Snakefile is read, before any job is planned.

A mistake in a dataset's settings (an unknown class, a missing region, a root that is not there)
would otherwise pass ``snakemake -n`` and fail only inside the download job, after a cluster has
queued the run. Schema errors are reported in one line naming the key, not as the schema and the
whole merged config that Snakemake prints.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

from duplus.errors import ConfigError

log = logging.getLogger(__name__)


def schema_error(error: BaseException, config_files: Iterable[Any] = ()) -> ConfigError | None:
    """A one-line ``ConfigError`` for the jsonschema error inside Snakemake's ``validate`` failure.

    Returns None when ``error`` holds no jsonschema error (the caller then re-raises it as it is).
    """
    # Snakemake formats the jsonschema error into its message; the error itself is the one being handled.
    candidates = [*getattr(error, "args", ()), error.__cause__, error.__context__]
    cause = next((c for c in candidates if hasattr(c, "absolute_path") and hasattr(c, "message")), None)
    if cause is None:
        return None
    key = ".".join(str(part) for part in cause.absolute_path) or "config"
    files = ", ".join(dict.fromkeys(str(f) for f in config_files))
    hint = ("; Snakemake passes nested --config values as text: put them in a --configfile"
            if _typed_text(cause) else "")
    return ConfigError(f"{key}: {cause.message}" + (f" (config files: {files})" if files else "") + hint)


_JSON_TYPES = {"integer": (int,), "number": (int, float), "boolean": (bool,), "null": (type(None),)}


def _typed_text(cause: Any) -> bool:
    """Whether a type error is about text that YAML reads as the expected type (or as null).

    ``--config 'lora={"steps": 81}'`` reaches the config as ``{"steps": "81"}``: Snakemake reads
    nested --config values with YAML's base loader, which keeps every scalar a string.
    """
    if getattr(cause, "validator", None) != "type" or not isinstance(cause.instance, str):
        return False
    import yaml

    try:
        value = yaml.safe_load(cause.instance)
    except yaml.YAMLError:
        return False
    if value is None:
        return True  # `null` as text: a removal (`datasets={"x": null}`) that needs a --configfile
    expected = cause.validator_value
    types = [expected] if isinstance(expected, str) else list(expected or ())
    # bool is an int in Python, but "true" is no integer to the schema.
    return any(isinstance(value, _JSON_TYPES.get(name, ())) and (name == "boolean") == isinstance(value, bool)
               for name in types)


def check_config(config: Mapping[str, Any]) -> None:
    """Every dataset's settings make a dataset, user data roots exist, stage references are datasets,
    a prognosis run on a built-in dataset has an EHR table.

    Raises one ``ConfigError`` listing every problem found, each naming its key and its fix. Warns
    about a region the prompts do not know (it is used as written, "A computed tomography scan of
    the <region>"), a declared class whose name is close to a built-in one (declared as a class of
    its own, never merged), and label names that differ from the dataset's own dataset.json.
    """
    from duplus.data.registry import USER_KINDS, check_user_root, config_problems
    from duplus.data.taxonomy import REGIONS

    problems = config_problems(config)
    usable = _usable_specs(config)
    for spec in usable:
        if spec.root is not None:
            try:
                check_user_root(spec)
            except ConfigError as error:
                problems.append(str(error))
        if spec.region not in REGIONS:
            log.warning("datasets.%s.region: '%s' is none of the regions the prompts know (%s); it will be "
                        "used as written", spec.name, spec.region, ", ".join(REGIONS))
        if spec.kind in USER_KINDS:
            _warn_label_source_mismatch(spec, (config.get("datasets") or {}).get(spec.name) or {})
    _warn_close_declarations(config)
    if not problems:
        try:
            _check_prognosis_table(config)
        except ConfigError as error:
            problems.append(str(error))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the config:\n  " + "\n  ".join(problems))


def _usable_specs(config: Mapping[str, Any]) -> list[Any]:
    """The specs of the datasets whose settings make one (the others are among the listed problems)."""
    from duplus.data.registry import _dataset

    specs = []
    for name in config.get("datasets") or {}:
        try:
            specs.append(_dataset(name, config))
        except ConfigError:
            continue
    return specs


def _warn_close_declarations(config: Mapping[str, Any]) -> None:
    """A declared class named like a built-in one is probably a typo or a synonym: say so, keep it apart."""
    from duplus.data.taxonomy import close_builtin_classes, declared_classes, parents

    for info in declared_classes():
        # "left hippocampus" under parent hippocampus is a part of it, declared as such: nothing to say.
        close = [name for name in close_builtin_classes(info.name) if name not in parents(info.name)]
        if close:
            log.warning("declared class '%s' is close to the built-in class(es) %s: it is trained and scored as a "
                        "class of its own; if it is the same structure, drop the declaration and name '%s' in "
                        "labels (a parent: %s makes it a part of it)", info.name, ", ".join(close), close[0],
                        close[0])


def _warn_label_source_mismatch(spec: Any, settings: Mapping[str, Any]) -> None:
    """Labels given in the config that differ from the folder's own dataset.json: the config wins, but
    a renumbered export (2 is the tumour here, the vessel there) is worth a look before training."""
    from pathlib import Path

    from duplus.data.registry import dataset_json_labels
    from duplus.data.taxonomy import canonical_name

    if spec.kind != "msd" or not settings.get("labels"):
        return
    listed, _ = dataset_json_labels(Path(str(spec.root)))
    listed = {k: v for k, v in listed.items() if k != 0}
    if not listed:
        return
    differences = []
    for label_id in sorted(set(listed) | set(spec.labels)):
        ours, theirs = spec.labels.get(label_id), listed.get(label_id)
        if theirs is None:
            differences.append(f"{label_id}: '{ours}' in the config, absent from dataset.json")
        elif ours is None:
            differences.append(f"{label_id}: '{theirs}' in dataset.json, not in the config (taken as background)")
        elif (canonical_name(theirs) or theirs) != ours:
            differences.append(f"{label_id}: '{ours}' in the config, '{theirs}' in dataset.json")
    if differences:
        log.warning("datasets.%s.labels differ from %s (the config's are used): %s", spec.name,
                    Path(str(spec.root)) / "dataset.json", "; ".join(differences))


def _check_prognosis_table(config: Mapping[str, Any]) -> None:
    """A prognosis run on a built-in dataset that comes with no EHR table, and names none, would
    fail only in the prognosis job, after pretraining."""
    from pathlib import Path

    from duplus.data.registry import USER_KINDS, builtin_datasets, get_dataset, listed_datasets, raw_folder
    from duplus.settings import Settings

    settings = Settings.of(config)
    prognosis = settings.prognosis
    # The table is looked for beside the first dataset's images (HECKTOR's CT and PET share one folder).
    names = listed_datasets(prognosis.dataset)
    if not prognosis.enabled or not names or prognosis.ehr.table:
        return
    name = names[0]
    spec = get_dataset(name, config)
    if spec.kind in USER_KINDS or spec.clinical:
        return  # a dataset of your own may hold clinical.csv: the stage says so if it does not
    raw = Path(settings.paths.raw)
    if (raw_folder(spec, raw) / "clinical.csv").is_file():
        return  # put in place by hand
    with_table = ", ".join(sorted(n for n, s in builtin_datasets().items() if s.clinical))
    raise ConfigError(f"prognosis.dataset: '{name}' comes with no EHR table (of the built-in datasets only "
                      f"{with_table} do) and prognosis.ehr.table is null; name your clinical CSV in "
                      f"prognosis.ehr.table, or set prognosis.enabled: false")

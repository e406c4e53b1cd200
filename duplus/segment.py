"""`duplus segment`: segment one scan with free-text class prompts; masks land on exactly the input grid.

Reads NIfTI/NRRD/MHA or a DICOM folder, preprocesses as in training, runs sliding-window inference,
restores. The output folder (names, format, stale files, writing) is :mod:`duplus.segment_outputs`;
checks of options and scan are :mod:`duplus.segment_checks`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from duplus import __version__
from duplus.errors import ConfigError, DataError, DuplusError, ModelError
from duplus.segment_checks import warn_if_ct_like, warn_if_not_ct_like  # noqa: F401 - part of this module's API
from duplus.segment_outputs import (  # noqa: F401 - part of this module's API
    FORMATS,
    OUTPUT_TYPES,
    REPORT,
    check_outputs,
    output_names,
    overlap_notes,
    safe_name,
    write_masks,
)

log = logging.getLogger("duplus.segment")


def default_paths(config: Mapping[str, Any]) -> tuple[str, str]:
    """(weights, prompt cache) of the pipeline run that ``config`` describes."""
    results = Path(str((config.get("paths") or {}).get("results", "results")))
    encoder = str((config.get("prompts") or {}).get("encoder", "minilm"))
    return str(results / "pretrain" / "model.safetensors"), str(results / "prompts" / f"{encoder}.safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `duplus segment`."""
    parser.add_argument("-i", "--input", required=True,
                        help="NIfTI/NRRD/MHA file or a folder holding one DICOM series; or, for many scans, a folder "
                             "searched recursively for both, or a CSV with a column 'image' (and optionally 'id')")
    parser.add_argument("-o", "--output", required=True,
                        help="output folder (created); files an earlier run's report.json there lists are replaced. "
                             "Many scans: one subfolder per scan, and summary.json/summary.csv")
    parser.add_argument("--format", default=None, choices=FORMATS,
                        help="mask file format (default: the input's: NIfTI stays .nii.gz, NRRD .nrrd, MetaImage .mha, "
                             "a DICOM folder gets .nrrd, which keeps its geometry exactly)")
    parser.add_argument("--output-type", default="masks", choices=OUTPUT_TYPES,
                        help="masks: mask images (see --format); dicom_seg: one DICOM Segmentation, dicom_rtstruct: one "
                             "RT Structure Set, each referencing the input DICOM series (DICOM series input only)")
    parser.add_argument("--prompts", default=None, help='classes to segment, comma-separated: "liver, liver tumor"')
    parser.add_argument("--modality", required=True, help="CT, MRI (MR) or PET")
    parser.add_argument("--channel", type=int, default=None,
                        help="volume to segment of a 4-D image (or component of a vector image), from 0")
    parser.add_argument("--region", default=None, help="body region of the context prompt (default: the first class's region)")
    parser.add_argument("--sequence", default=None, help="MRI sequence, e.g. T1, T2 (changes the prompts; MRI only)")
    parser.add_argument("--weights", default=None,
                        help="model .safetensors (default: <paths.results>/pretrain/model.safetensors of the config)")
    parser.add_argument("--sha256", default=None, help="refuse weights whose sha256 differs from this")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder of a center (results/lora/<center>)")
    parser.add_argument("--dataset-classes", default=None, metavar="NAME",
                        help="segment every class of this dataset (see `duplus list-datasets`)")
    parser.add_argument("--multilabel", "--ml", action="store_true",
                        help="one label image + labels.json instead of one mask per class")
    parser.add_argument("--device", default="auto",
                        help="auto | cpu | cuda | cuda:N | gpu | gpu:N (= cuda) | mps (any case)")
    parser.add_argument("--prompt-cache", default=None,
                        help="prompt embedding cache, read only (default: <paths.results>/prompts/<prompts.encoder>"
                             ".safetensors of the config); prompts it lacks are encoded for this run")
    parser.add_argument("--config", default=None,
                        help="run config for preprocessing and windows (default ./config.yaml if present)")
    parser.add_argument("--threshold", type=float, default=None, help="sigmoid threshold (default inference.threshold)")
    parser.add_argument("--fast", action="store_true",
                        help="windows overlap 0.25 instead of inference.overlap: fewer windows, slightly rougher masks "
                             "(README: measured speed-up and Dice cost)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")


def check_arguments(args: argparse.Namespace) -> None:
    """The mistakes a command line can hold that need no scan and no model, answered before torch is imported.

    Raises ``ConfigError`` (or ``DataError`` for a missing input) naming the option.
    """
    from duplus.prompts.catalog import split_free_text
    from duplus.prompts.templates import normalize_modality
    from duplus.runtime import device_name
    from duplus.segment_batch import is_batch_input
    from duplus.segment_outputs import DICOM_OUTPUTS, check_output_folder, output_format

    if not Path(args.input).exists():
        raise DataError(f"{args.input}: file not found (-i takes a scan, a DICOM folder, a folder of scans or a CSV "
                        "list of them)")
    check_output_folder(args.output)
    if args.prompts is None and not args.dataset_classes:
        raise ConfigError('--prompts is missing: name the classes to segment, comma-separated, e.g. --prompts '
                          '"liver, liver tumor" (`duplus list-classes` lists them), or give --dataset-classes')
    if args.prompts is not None:
        try:
            split_free_text(args.prompts)
        except DuplusError:
            raise ConfigError(f"--prompts {args.prompts!r}: no class named in it; give class names separated by "
                              'commas, e.g. --prompts "liver, liver tumor"') from None
    try:
        normalize_modality(args.modality)
    except DuplusError as error:
        raise ConfigError(f"--modality: {error}") from None
    device_name(args.device)
    if args.threshold is not None and not 0.0 < float(args.threshold) < 1.0:
        raise ConfigError(f"--threshold {args.threshold}: a sigmoid threshold lies strictly between 0 and 1")
    output_type = getattr(args, "output_type", None)
    if args.multilabel and output_type in DICOM_OUTPUTS:
        raise ConfigError(f"--multilabel is for mask images; --output-type {output_type} holds every class in its "
                          "one file already: give one of the two")
    # Many scans: a DICOM output type is checked against each scan before the first is segmented.
    output_format(args.input, args.format, None if is_batch_input(args.input) else output_type)
    for option, path in (("--weights", args.weights), ("--config", args.config), ("--adapter", args.adapter)):
        if path and not Path(path).exists():
            raise ConfigError(f"{option} {path}: not found")


def run(args: argparse.Namespace) -> int:
    """CLI entry: 0 on success; 2 with a one-line message for any ``DuplusError`` or file-system error;
    for many scans, 1 when some failed (the summary names them)."""
    from duplus.segment_batch import is_batch_input

    try:
        check_arguments(args)
        options = dict(region=args.region, sequence=args.sequence, weights=args.weights, sha256=args.sha256,
                       adapter=args.adapter, dataset_classes=args.dataset_classes, multilabel=args.multilabel,
                       device=args.device, prompt_cache=args.prompt_cache, config=_with_fast(args, load_config(args.config)),
                       threshold=args.threshold)
        if is_batch_input(args.input):
            return _run_batch(args, options)
        report = segment_image(args.input, args.output, args.prompts, args.modality, channel=args.channel,
                               mask_format=args.format, output_type=args.output_type, **options)
    except DuplusError as error:
        print(f"duplus: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an unwritable output folder, a full disk: no traceback, the file named
        where = f"{error.filename}: " if error.filename else ""
        print(f"duplus: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    print(f"wrote {len(report['outputs'])} file(s) to {args.output} (report: {report['report']})")
    return 0


def _run_batch(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from duplus.segment_batch import SUMMARY_JSON, find_scans, run_batch

    scans = find_scans(args.input, args.output)
    segmenter = Segmenter(args.prompts, args.modality, **options)
    summary = run_batch(segmenter, scans, args.output, channel=args.channel, mask_format=args.format,
                        output_type=args.output_type)
    counts = summary["counts"]
    print(f"{len(scans)} scan(s): {counts['done']} segmented, {counts['skipped']} already done, {counts['failed']} "
          f"failed (summary: {Path(args.output) / SUMMARY_JSON})")
    for row in summary["scans"]:
        if row["status"] == "failed":
            print(f"duplus: failed: {row['scan']}: {row['error']}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _with_fast(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    from duplus.inference.predict import fast_config

    return fast_config(config) if getattr(args, "fast", False) else config


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
        if item[2] in unique:
            log.info("%r asks for the same class as %r; segmented once", item[0], unique[item[2]][0])
        else:
            unique[item[2]] = item
    return list(unique.values())


def prompt_embeddings(cache_path: str, texts: list[str], config: Mapping[str, Any], device: Any) -> Any:
    """Embeddings of ``texts``: from the cache, missing ones encoded for this run (the text model
    loads only then). The cache is never written: it is an input of every pipeline stage, and a
    changed file would make Snakemake rerun them all."""
    from duplus.prompts.cache import ensure_prompts
    from duplus.prompts.encoder import encoder_from_config

    return ensure_prompts(cache_path, texts, lambda: encoder_from_config(dict(config), device=device), persist=False)


def default_region(resolved: list[Any], spec_region: str | None) -> str:
    if spec_region:
        return spec_region
    from duplus.data.taxonomy import region_of

    for item in resolved:
        if item[1] is not None:
            return region_of(item[1])
    raise ConfigError("no class prompt is a known class, so the body region is unknown: correct the class names "
                      "warned about above (`duplus list-classes`), or give --region (e.g. abdomen) to segment "
                      "them as typed")


def _load_network(weights: str, sha256: str | None, adapter: str | None, device: Any) -> tuple[Any, dict[str, Any]]:
    from duplus.model import load_model

    model, sidecar = load_model(weights, expected_sha256=sha256, device=device)
    if adapter:
        if not Path(adapter).exists():
            raise ModelError(f"{adapter}: adapter folder not found")
        from duplus.train.adapters import load_adapter  # peft loads only when an adapter is asked for

        folder = Path(adapter)
        # Accept the center's results folder (results/lora/<center>) as well as its adapter/ inside.
        if (folder / "adapter").is_dir():
            folder = folder / "adapter"
        load_adapter(model, folder, sidecar["sha256"])
        model = model.to(device).eval()
    return model, sidecar


class Prepared(NamedTuple):
    """A scan read, checked, hashed and preprocessed: all a prediction needs of it (made ahead in batch mode)."""

    image: str
    scan: Any
    sources: list[Path]
    sha256: str
    array: Any
    meta: Any
    seconds: float


# Loaded networks, so that many scans, or many calls of :func:`segment_images`, load a model once. One entry:
# a notebook that switches models does not keep the old one in memory.
_NETWORKS: dict[tuple[Any, ...], tuple[Any, dict[str, Any]]] = {}


def _network_key(weights: str, sha256: str | None, adapter: str | None, device: Any) -> tuple[Any, ...]:
    def stamp(path: str | None) -> Any:
        # Size and mtime: a file replaced under the same name (a new training run) is loaded afresh.
        return (str(Path(path).resolve()), Path(path).stat().st_size, Path(path).stat().st_mtime_ns) \
            if path and Path(path).is_file() else (path,)

    return stamp(weights), (sha256 or "").strip().lower(), stamp(adapter), str(device)


def _cached_network(weights: str, sha256: str | None, adapter: str | None, device: Any) -> tuple[Any, dict[str, Any]]:
    key = _network_key(weights, sha256, adapter, device)
    if key not in _NETWORKS:
        network = _load_network(weights, sha256, adapter, device)
        _NETWORKS.clear()
        _NETWORKS[key] = network
    return _NETWORKS[key]


class Segmenter:
    """The prompts, options and (once a scan needs it) model of `duplus segment`, for one scan or many.

    Everything that does not depend on a scan is checked on construction, before any scan is read;
    the network and the prompt embeddings load with the first scan and serve every later one.
    """

    def __init__(
        self,
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
    ) -> None:
        from duplus.model import MODALITIES, modality_index
        from duplus.prompts.templates import context_prompt
        from duplus.runtime import resolve_device
        from duplus.segment_checks import check_dataset_modality, check_sequence, warn_if_unknown_region

        config = dict(config or {})
        default_weights, default_cache = default_paths(config)  # the run's own files unless given
        if weights is None and not Path(default_weights).is_file():
            raise ConfigError(f"{default_weights}: no trained model there (the default of a run in {Path.cwd()}); "
                              "give --weights (and --prompt-cache), or --config of the run that trained it")
        self.weights, self.prompt_cache = str(weights or default_weights), str(prompt_cache or default_cache)
        if threshold is not None and not 0.0 < float(threshold) < 1.0:
            raise ConfigError(f"--threshold {threshold}: a sigmoid threshold lies strictly between 0 and 1")
        self.modality = MODALITIES[modality_index(modality)]
        self.device = resolve_device(device)  # a misspelt --device fails here, not after the scan is read
        check_sequence(sequence, self.modality)
        spec_region, classes_of_dataset = None, []
        if dataset_classes:
            from duplus.data.registry import get_dataset

            try:
                spec = get_dataset(dataset_classes, config)
            except ConfigError as error:
                raise ConfigError(f"--dataset-classes {dataset_classes}: {error} (a dataset of your own is read from "
                                  "--config, default ./config.yaml: give the config that declares it)") from None
            check_dataset_modality(dataset_classes, spec.modality, self.modality)
            classes_of_dataset = list(dict.fromkeys(spec.labels[k] for k in sorted(spec.labels)))
            spec_region, sequence = spec.region, sequence or spec.sequence
        self.resolved = resolve_prompts(prompts, self.modality, sequence, classes_of_dataset)
        if region:
            # As the registry spells regions (lower case), so the context prompt is the one trained on.
            region = " ".join(region.split()).lower()
            warn_if_unknown_region(region, config)
        else:
            region = " ".join(default_region(self.resolved, spec_region).split()).lower()
        self.region, self.sequence = region, (" ".join(sequence.split()) if sequence else sequence)
        self.names = [item[1] or item[0] for item in self.resolved]
        self.context_text = context_prompt(self.modality, self.region, self.sequence)
        self.sha256, self.adapter, self.multilabel = sha256, adapter, bool(multilabel)
        self.config, self.threshold = config, threshold
        self._sidecar: dict[str, Any] | None = None
        self._adapter_sha256: str | None = None
        self._zero_shot: list[str] | None = None
        self._loaded: tuple[Any, Any] | None = None  # (model, prompt embeddings)
        self.load_seconds = 0.0

    def sidecar(self) -> dict[str, Any]:
        """The model's sidecar (its JSON only: the weights load, and are verified against it, in :meth:`load`)."""
        if self._sidecar is None:
            from duplus.model import read_sidecar

            self._sidecar = read_sidecar(self.weights)
        return self._sidecar

    def files(self, fmt: str) -> list[str]:
        return output_names(self.names, self.multilabel, fmt)

    def window_config(self) -> dict[str, Any]:
        from duplus.model import with_trained_window

        return with_trained_window(self.config, self.sidecar())

    def settings(self, fmt: str, channel: int | None) -> dict[str, Any]:
        """What decides the masks, besides the scan: a rerun whose report holds the same settings may skip it."""
        from duplus.inference.predict import inference_settings

        sidecar = self.sidecar()
        settings = inference_settings(self.window_config())
        return {
            "model_sha256": sidecar["sha256"], "adapter_sha256": self.adapter_sha256(),
            "modality": self.modality, "region": self.region, "sequence": self.sequence,
            "context_prompt": self.context_text, "classes": self.names, "texts": [item[2] for item in self.resolved],
            "threshold": settings["threshold"] if self.threshold is None else float(self.threshold),
            "window": [int(v) for v in settings["roi"]], "overlap": settings.get("overlap"),
            "preprocess": self.preprocess_config().get("preprocess"),
            "multilabel": self.multilabel, "format": fmt, "channel": channel,
        }

    def zero_shot(self) -> list[str]:
        """Prompts the model never trained on (its sidecar's classes, modalities and regions), one line each."""
        from duplus.segment_knowledge import trained_on, zero_shot_notes

        if self._zero_shot is None:
            self._zero_shot = zero_shot_notes(trained_on(self.sidecar(), self.config), self.modality, self.region,
                                              self.names)
        return self._zero_shot

    def adapter_sha256(self) -> str | None:
        if self._adapter_sha256 is None:
            self._adapter_sha256 = _adapter_hash(self.adapter) or ""
        return self._adapter_sha256 or None

    def preprocess_config(self) -> dict[str, Any]:
        return {**self.config, "preprocess": self.sidecar().get("preprocess", self.config.get("preprocess") or {})}

    def prepare(self, image: str | Path, channel: int | None = None) -> Prepared:
        """Read, check, hash and preprocess ``image`` (safe to run in a thread beside :meth:`predict`)."""
        from duplus.data.io import read_image_files
        from duplus.hashing import sha256_files

        started = time.perf_counter()
        scan, sources = read_image_files(image, channel)  # DataError naming the file: missing, unreadable, 4-D, NaN
        return self._prepared(scan, sources, str(image), sha256_files(sources), started)

    def prepare_image(self, scan: Any, name: str = "image") -> Prepared:
        """:meth:`prepare` for a SimpleITK image in memory (``name`` is what messages call it)."""
        from duplus.data.io import check_image

        started = time.perf_counter()
        return self._prepared(check_image(scan, name), [], name, "", started)

    def _prepared(self, scan: Any, sources: list[Path], image: str, input_sha256: str, started: float) -> Prepared:
        from duplus.data.preprocess import prepare_image
        from duplus.segment_checks import warn_if_wrong_modality

        direction = np.asarray(scan.GetDirection(), dtype=float).reshape(3, 3)
        if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
            raise DataError(f"{image}: the scan's grid is sheared (its direction matrix is not orthonormal, e.g. a CT "
                            "gantry tilt); preprocessing and restoring assume an orthogonal grid, so resample the scan "
                            "onto one first")
        warn_if_wrong_modality(scan, self.modality, image)
        try:
            array, meta = prepare_image(scan, self.modality, self.preprocess_config())
        except DataError as error:
            raise DataError(f"{image}: {error}") from None
        return Prepared(image, scan, sources, input_sha256, array, meta, time.perf_counter() - started)

    def load(self) -> tuple[Any, Any]:
        """The network and the prompt embeddings, loaded on first use (a cached network is reused)."""
        if self._loaded is None:
            from duplus.runtime import configure_kernels

            started = time.perf_counter()
            configure_kernels(self.device, bool(self.config.get("deterministic", False)))
            model, sidecar = _cached_network(self.weights, self.sha256, self.adapter, self.device)
            self._sidecar = sidecar
            cache = prompt_embeddings(self.prompt_cache, [self.context_text] + [item[2] for item in self.resolved],
                                      self.config, self.device)
            check_encoder(cache, sidecar, self.prompt_cache, self.weights)
            self._loaded = (model, cache)
            for note in self.zero_shot():
                log.warning("%s", note)
            self.load_seconds = time.perf_counter() - started
        return self._loaded

    def predict(self, prepared: Prepared) -> Any:
        """Masks of the prompted classes on the preprocessed grid (``PackedMasks``)."""
        from duplus.inference.predict import predict_masks

        model, cache = self.load()
        window_config = self.window_config()
        return predict_masks(model, prepared.array, self.modality, cache.get(self.context_text),
                             cache.get_many([item[2] for item in self.resolved]), window_config,
                             threshold=self.threshold, desc="segment")

    def masks(self, prepared: Prepared) -> dict[str, Any]:
        """Class name -> uint8 SimpleITK mask on the scan's own grid (nothing written)."""
        from duplus.segment_outputs import restored_mask

        masks = self.predict(prepared)
        return {name: restored_mask(masks, k, prepared.meta) for k, name in enumerate(self.names)}

    def segment(self, image: str | Path, out_dir: str | Path, *, channel: int | None = None,
                mask_format: str | None = None, prepared: Prepared | None = None,
                output_type: str | None = None) -> dict[str, Any]:
        """Segment ``image`` into ``out_dir``; returns the run report (also written as JSON, last).

        ``output_type``: one of ``OUTPUT_TYPES`` (default masks); a DICOM type needs a DICOM series folder.

        ``prepared``: the scan already read by :meth:`prepare` (batch mode reads the next scan
        while this one is predicted).
        """
        from duplus.atomic import write_json
        from duplus.segment_outputs import output_format, prepare_folder, previous_outputs, remove_stale

        started = time.perf_counter()
        timings: dict[str, float] = {}
        fmt = output_format(image, mask_format, output_type)
        files = self.files(fmt)
        check_outputs(image, out_dir, files)  # before any work: never over the input
        read_ahead = prepared is not None
        if prepared is None:
            prepared = self.prepare(image, channel)
        timings["read_and_preprocess"] = prepared.seconds
        # Only once the scan is known good: a mistyped -i must not create folders or touch an earlier run.
        out = prepare_folder(out_dir)
        previous = previous_outputs(out)
        already = self._loaded is not None
        self.load()
        timings["load_model"] = 0.0 if already else self.load_seconds
        settings = self.settings(fmt, channel)
        mark = time.perf_counter()
        masks = self.predict(prepared)
        timings["predict"] = time.perf_counter() - mark

        mark = time.perf_counter()
        remove_stale(out, previous, files, image)
        outputs = write_masks(out, masks, prepared.meta, self.names, self.multilabel, fmt, prepared.sources, image)
        timings["restore_and_write"] = time.perf_counter() - mark
        # A scan read ahead (in a thread, while the one before it was predicted) adds its reading time.
        timings["total"] = time.perf_counter() - started + (prepared.seconds if read_ahead else 0.0)

        scan, sidecar = prepared.scan, self.sidecar()
        report = {
            "duplus_version": __version__,
            "input": str(image),
            "input_geometry": {"size": list(scan.GetSize()), "spacing": list(scan.GetSpacing()),
                               "origin": list(scan.GetOrigin()), "direction": list(scan.GetDirection())},
            "model": {"weights": self.weights, "sha256": sidecar["sha256"], "text_encoder": sidecar.get("text_encoder")},
            "adapter": {"path": str(self.adapter), "sha256": settings["adapter_sha256"]} if self.adapter else None,
            "modality": self.modality, "region": self.region, "sequence": self.sequence,
            "context_prompt": self.context_text,
            "prompts": [{"phrase": item[0], "class": item[1], "text": item[2], "label": i + 1,
                         "output": outputs[0] if self.multilabel else outputs[i]}
                        for i, item in enumerate(self.resolved)],
            "threshold": settings["threshold"], "window": settings["window"], "device": str(self.device),
            "outputs": outputs,
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            # One file: its sha256; a .mhd/.nhdr header and its data, or a DICOM series: see sha256_files.
            "input_sha256": prepared.sha256, "input_files_hashed": len(prepared.sources),
            "input_files": [str(path) for path in prepared.sources],
            "channel": channel, "format": fmt,
            "zero_shot": self.zero_shot(),
            # What a rerun compares to skip this scan (batch mode): see Segmenter.settings.
            "settings": settings,
        }
        report_path = out / REPORT
        report["report"] = str(report_path)
        write_json(report_path, report)
        return report


def segment_image(
    image: str,
    out_dir: str,
    prompts: str | Sequence[str] | None,
    modality: str,
    *,
    channel: int | None = None,
    mask_format: str | None = None,
    output_type: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Segment ``image`` for the prompted classes; returns the run report (also written as JSON, last).

    ``options`` are :class:`Segmenter`'s (region, sequence, weights, sha256, adapter, dataset_classes,
    multilabel, device, prompt_cache, config, threshold). Masks are written as ``mask_format`` (one of
    ``FORMATS``; default: the input's format, see :func:`duplus.segment_outputs.output_format`), or, for a
    DICOM series, as one DICOM SEG or RTSTRUCT file (``output_type``, see :mod:`duplus.segment_dicom`). Files an
    earlier run's report in ``out_dir`` lists and this run does not write are removed, as is that
    report, before the masks are written.
    """
    return Segmenter(prompts, modality, **options).segment(image, out_dir, channel=channel, mask_format=mask_format,
                                                           output_type=output_type)


# The Segmenter of the last `segment_images` call: the same prompts and options again reuse its prompt
# embeddings (a text encoder loads only for prompts the cache lacks); the network is cached apart.
_LAST_SEGMENTER: dict[str, Segmenter] = {}


def segment_images(
    images: Any,
    prompts: str | Sequence[str] | None,
    modality: str,
    *,
    spacing: Sequence[float] | None = None,
    **options: Any,
) -> Any:
    """Masks of the prompted classes for images in memory; nothing is written.

    ``images``: a SimpleITK image or a numpy array [Z, Y, X] (``spacing``: its x, y, z voxel size in
    mm, default 1 mm), or a list of them. Returns, per image, ``{class name: mask}`` on the image's
    own grid: a uint8 SimpleITK image for an image, a uint8 array for an array (a list for a list).
    ``options`` are :class:`Segmenter`'s (weights, prompt_cache, device, region, threshold, config...).
    The network loads once and is kept for later calls.
    """
    import json

    import SimpleITK as sitk

    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    key = json.dumps([prompts, modality, options], sort_keys=True, default=str)
    if key not in _LAST_SEGMENTER:
        _LAST_SEGMENTER.clear()
        _LAST_SEGMENTER[key] = Segmenter(prompts, modality, **options)
    segmenter = _LAST_SEGMENTER[key]
    results = []
    for index, item in enumerate(items):
        is_array = isinstance(item, np.ndarray)
        if is_array:
            if item.ndim != 3:
                raise DataError(f"image {index}: expected a 3-D array [Z, Y, X], got shape {item.shape}")
            scan = sitk.GetImageFromArray(np.ascontiguousarray(item, dtype=np.float32))
            scan.SetSpacing(tuple(float(v) for v in (spacing or (1.0, 1.0, 1.0))))
        elif isinstance(item, sitk.Image):
            scan = item
        else:
            raise DataError(f"image {index}: expected a SimpleITK image or a numpy array, got {type(item).__name__}")
        masks = segmenter.masks(segmenter.prepare_image(scan, f"image {index}"))
        results.append({name: sitk.GetArrayFromImage(mask) if is_array else mask for name, mask in masks.items()})
    return results[0] if single else results


def check_encoder(cache: Any, sidecar: Mapping[str, Any], cache_path: str, weights: str) -> None:
    """The prompt embeddings must come from the text encoder the model was trained with."""
    if int(cache.dim) != int(sidecar["text_dim"]):
        raise ModelError(f"{cache_path}: embeddings have dim {cache.dim}, but {weights} expects {sidecar['text_dim']}")
    trained = sidecar.get("text_encoder")
    identity = getattr(cache, "encoder_identity", None)
    from duplus.prompts.cache import same_encoder

    if isinstance(trained, str) and trained and identity and not same_encoder(identity, trained):
        raise ModelError(
            f"{cache_path}: embeddings come from encoder {identity}, but {weights} was trained with {trained}"
        )


def _adapter_hash(adapter: str | None) -> str | None:
    from duplus.hashing import sha256_tree

    return sha256_tree(adapter) if adapter and Path(adapter).is_dir() else None

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
from typing import Any, Mapping, Sequence

import numpy as np

from duplus import __version__
from duplus.errors import ConfigError, DataError, DuplusError, ModelError
from duplus.segment_checks import warn_if_ct_like, warn_if_not_ct_like  # noqa: F401 - part of this module's API
from duplus.segment_outputs import (  # noqa: F401 - part of this module's API
    FORMATS,
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
    parser.add_argument("-i", "--input", required=True, help="NIfTI/NRRD/MHA file or a folder holding one DICOM series")
    parser.add_argument("-o", "--output", required=True,
                        help="output folder (created); files an earlier run's report.json there lists are replaced")
    parser.add_argument("--format", default=None, choices=FORMATS,
                        help="mask file format (default: the input's: NIfTI stays .nii.gz, NRRD .nrrd, MetaImage .mha, "
                             "a DICOM folder gets .nrrd, which keeps its geometry exactly)")
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
    parser.add_argument("--multilabel", action="store_true", help="one label image + labels.json instead of one mask per class")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (any case)")
    parser.add_argument("--prompt-cache", default=None,
                        help="prompt embedding cache, read only (default: <paths.results>/prompts/<prompts.encoder>"
                             ".safetensors of the config); prompts it lacks are encoded for this run")
    parser.add_argument("--config", default=None, help="run config for preprocessing and windows (default ./config.yaml if present)")
    parser.add_argument("--threshold", type=float, default=None, help="sigmoid threshold (default inference.threshold)")


def run(args: argparse.Namespace) -> int:
    """CLI entry: 0 on success; 2 with a one-line message for any ``DuplusError`` or file-system error."""
    try:
        report = segment_image(
            args.input, args.output, args.prompts, args.modality, region=args.region, sequence=args.sequence,
            weights=args.weights, sha256=args.sha256, adapter=args.adapter,
            dataset_classes=args.dataset_classes, multilabel=args.multilabel, device=args.device,
            prompt_cache=args.prompt_cache, config=load_config(args.config), threshold=args.threshold,
            channel=args.channel, mask_format=args.format,
        )
    except DuplusError as error:
        print(f"duplus: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # an unwritable output folder, a full disk: no traceback, the file named
        where = f"{error.filename}: " if error.filename else ""
        print(f"duplus: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    print(f"wrote {len(report['outputs'])} file(s) to {args.output} (report: {report['report']})")
    return 0


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


def segment_image(
    image: str,
    out_dir: str,
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
    channel: int | None = None,
    mask_format: str | None = None,
) -> dict[str, Any]:
    """Segment ``image`` for the prompted classes; returns the run report (also written as JSON, last).

    Masks are written as ``mask_format`` (one of ``FORMATS``; default: the input's format, see
    :func:`duplus.segment_outputs.output_format`). Files an earlier run's report in ``out_dir``
    lists and this run does not write are removed, as is that report, before the masks are written.
    """
    from duplus.atomic import write_json
    from duplus.data.io import read_image_files
    from duplus.data.preprocess import prepare_image
    from duplus.evaluate.inference import inference_settings, predict_masks
    from duplus.hashing import sha256_files
    from duplus.model import MODALITIES, modality_index, with_trained_window
    from duplus.runtime import configure_kernels, resolve_device
    from duplus.segment_checks import (check_dataset_modality, check_sequence, warn_if_unknown_region,
                                       warn_if_wrong_modality)
    from duplus.segment_outputs import output_format, prepare_folder, previous_outputs, remove_stale

    config = dict(config or {})
    default_weights, default_cache = default_paths(config)  # the run's own files unless given
    if weights is None and not Path(default_weights).is_file():
        raise ConfigError(f"{default_weights}: no trained model there (the default of a run in {Path.cwd()}); "
                          "give --weights (and --prompt-cache), or --config of the run that trained it")
    weights, prompt_cache = weights or default_weights, prompt_cache or default_cache
    if threshold is not None and not 0.0 < float(threshold) < 1.0:
        raise ConfigError(f"--threshold {threshold}: a sigmoid threshold lies strictly between 0 and 1")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    modality_name = MODALITIES[modality_index(modality)]
    torch_device = resolve_device(device)  # a misspelt --device fails here, not after the scan is read
    fmt = output_format(image, mask_format)
    check_sequence(sequence, modality_name)
    spec_region, classes_of_dataset = None, []
    if dataset_classes:
        from duplus.data.registry import get_dataset

        try:
            spec = get_dataset(dataset_classes, config)
        except ConfigError as error:
            raise ConfigError(f"--dataset-classes {dataset_classes}: {error} (a dataset of your own is read from "
                              "--config, default ./config.yaml: give the config that declares it)") from None
        check_dataset_modality(dataset_classes, spec.modality, modality_name)
        classes_of_dataset = list(dict.fromkeys(spec.labels[k] for k in sorted(spec.labels)))
        spec_region, sequence = spec.region, sequence or spec.sequence
    resolved = resolve_prompts(prompts, modality_name, sequence, classes_of_dataset)
    if region:
        # As the registry spells regions (lower case), so the context prompt is the one trained on.
        region = " ".join(region.split()).lower()
        warn_if_unknown_region(region, config)
    else:
        region = " ".join(default_region(resolved, spec_region).split()).lower()
    sequence = " ".join(sequence.split()) if sequence else sequence

    names = [item[1] or item[0] for item in resolved]
    files = output_names(names, multilabel, fmt)
    check_outputs(image, out_dir, files)  # before any work: never over the input
    scan, sources = read_image_files(image, channel)  # DataError naming the file: missing, unreadable, 4-D, NaN
    direction = np.asarray(scan.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
        raise DataError(f"{image}: the scan's grid is sheared (its direction matrix is not orthonormal, e.g. a CT "
                        "gantry tilt); preprocessing and restoring assume an orthogonal grid, so resample the scan "
                        "onto one first")
    # Only once the scan is known good: a mistyped -i must not create folders or touch an earlier run.
    out = prepare_folder(out_dir)
    previous = previous_outputs(out)
    warn_if_wrong_modality(scan, modality_name, image)
    input_sha256 = sha256_files(sources)
    configure_kernels(torch_device, bool(config.get("deterministic", False)))
    model, sidecar = _load_network(weights, sha256, adapter, torch_device)
    timings["load_model"] = time.perf_counter() - started

    from duplus.prompts.templates import context_prompt

    context_text = context_prompt(modality_name, region, sequence)
    texts = [context_text] + [item[2] for item in resolved]
    cache = prompt_embeddings(prompt_cache, texts, config, torch_device)
    check_encoder(cache, sidecar, prompt_cache, weights)
    mark = time.perf_counter()
    preprocess_config = {**config, "preprocess": sidecar.get("preprocess", config.get("preprocess") or {})}
    try:
        array, meta = prepare_image(scan, modality_name, preprocess_config)
    except DataError as error:
        raise DataError(f"{image}: {error}") from None
    timings["preprocess"] = time.perf_counter() - mark

    window_config = with_trained_window(config, sidecar)
    settings = inference_settings(window_config)
    cut = settings["threshold"] if threshold is None else float(threshold)
    mark = time.perf_counter()
    masks = predict_masks(model, array, modality_name, cache.get(context_text),
                          cache.get_many([item[2] for item in resolved]), window_config, threshold=cut, desc="segment")
    timings["predict"] = time.perf_counter() - mark

    mark = time.perf_counter()
    remove_stale(out, previous, files, image)
    outputs = write_masks(out, masks, meta, names, multilabel, fmt)
    timings["restore_and_write"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started

    report = {
        "duplus_version": __version__,
        "input": str(image),
        "input_geometry": {"size": list(scan.GetSize()), "spacing": list(scan.GetSpacing()),
                           "origin": list(scan.GetOrigin()), "direction": list(scan.GetDirection())},
        "model": {"weights": str(weights), "sha256": sidecar["sha256"], "text_encoder": sidecar.get("text_encoder")},
        "adapter": {"path": str(adapter), "sha256": _adapter_hash(adapter)} if adapter else None,
        "modality": modality_name, "region": region, "sequence": sequence, "context_prompt": context_text,
        "prompts": [{"phrase": item[0], "class": item[1], "text": item[2], "label": i + 1,
                     "output": outputs[0] if multilabel else outputs[i]} for i, item in enumerate(resolved)],
        "threshold": cut, "window": list(settings["roi"]), "device": str(torch_device),
        "outputs": outputs,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        # One file: its sha256; a .mhd/.nhdr header and its data, or a DICOM series: see sha256_files.
        "input_sha256": input_sha256, "input_files_hashed": len(sources), "channel": channel, "format": fmt,
    }
    report_path = out / "report.json"
    report["report"] = str(report_path)
    write_json(report_path, report)
    return report


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

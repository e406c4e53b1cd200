"""`duplus segment`: segment one scan with free-text class prompts; masks land on exactly the input grid.

Reads NIfTI/NRRD or a DICOM folder, preprocesses as in training, runs sliding-window inference, restores.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from duplus import __version__
from duplus.errors import ConfigError, DataError, DuplusError, ModelError

log = logging.getLogger("duplus.segment")


def default_paths(config: Mapping[str, Any]) -> tuple[str, str]:
    """(weights, prompt cache) of the pipeline run that ``config`` describes."""
    results = Path(str((config.get("paths") or {}).get("results", "results")))
    encoder = str((config.get("prompts") or {}).get("encoder", "minilm"))
    return str(results / "pretrain" / "model.safetensors"), str(results / "prompts" / f"{encoder}.safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `duplus segment`."""
    parser.add_argument("-i", "--input", required=True, help="NIfTI/NRRD file or a folder holding one DICOM series")
    parser.add_argument("-o", "--output", required=True, help="output folder (created)")
    parser.add_argument("--prompts", default=None, help='classes to segment, comma-separated: "liver, liver tumor"')
    parser.add_argument("--modality", required=True, help="CT, MRI (MR) or PET")
    parser.add_argument("--channel", type=int, default=None,
                        help="volume to segment of a 4-D image (or component of a vector image), from 0")
    parser.add_argument("--region", default=None, help="body region of the context prompt (default: the first class's region)")
    parser.add_argument("--sequence", default=None, help="MRI sequence, e.g. T1, T2 (changes the prompts)")
    parser.add_argument("--weights", default=None,
                        help="model .safetensors (default: <paths.results>/pretrain/model.safetensors of the config)")
    parser.add_argument("--sha256", default=None, help="refuse weights whose sha256 differs from this")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder of a center (results/lora/<center>)")
    parser.add_argument("--dataset-classes", default=None, metavar="NAME",
                        help="segment every class of this dataset (see `duplus list-datasets`)")
    parser.add_argument("--multilabel", action="store_true", help="one label image + labels.json instead of one mask per class")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
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
            channel=args.channel,
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


def safe_name(name: str) -> str:
    """File-name form of a class: "liver tumor" -> "liver_tumor"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


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
) -> dict[str, Any]:
    """Segment ``image`` for the prompted classes; returns the run report (also written as JSON)."""
    from duplus.atomic import write_json
    from duplus.data.io import read_image
    from duplus.data.preprocess import prepare_image
    from duplus.evaluate.inference import inference_settings, predict_masks
    from duplus.hashing import sha256_file
    from duplus.model import MODALITIES, modality_index, with_trained_window
    from duplus.runtime import configure_kernels, resolve_device

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
    spec_region, classes_of_dataset = None, []
    if dataset_classes:
        from duplus.data.registry import get_dataset

        try:
            spec = get_dataset(dataset_classes, config)
        except ConfigError as error:
            raise ConfigError(f"--dataset-classes {dataset_classes}: {error} (a dataset of your own is read from "
                              "--config, default ./config.yaml: give the config that declares it)") from None
        classes_of_dataset = list(dict.fromkeys(spec.labels[k] for k in sorted(spec.labels)))
        spec_region, sequence = spec.region, sequence or spec.sequence
    resolved = resolve_prompts(prompts, modality_name, sequence, classes_of_dataset)
    # As the registry spells regions (lower case), so the context prompt is the one trained on.
    region = " ".join((region or default_region(resolved, spec_region)).split()).lower()
    sequence = " ".join(sequence.split()) if sequence else sequence

    names = [item[1] or item[0] for item in resolved]
    check_outputs(image, out_dir, output_names(names, multilabel))  # before any work: never over the input
    scan = read_image(image, channel)  # DataError naming the file: missing, unreadable, 4-D, NaN
    direction = np.asarray(scan.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-4):
        raise DataError(f"{image}: the scan's grid is sheared (its direction matrix is not orthonormal, e.g. a CT "
                        "gantry tilt); NIfTI masks cannot hold that grid, so resample the scan onto an orthogonal "
                        "grid first")
    warn_if_ct_like(scan, modality_name, image)
    input_sha256 = sha256_file(image) if Path(image).is_file() else None
    torch_device = resolve_device(device)
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
    outputs = write_masks(Path(out_dir), masks, meta, names, multilabel)
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
        "input_sha256": input_sha256, "channel": channel,
    }
    report_path = Path(out_dir) / "report.json"
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


def output_names(names: list[str], multilabel: bool) -> list[str]:
    """The files ``write_masks`` writes for these classes (``report.json`` comes beside them)."""
    if multilabel:
        return ["labels.nii.gz", "labels.json"]
    files, used = [], set()
    for name in names:
        stem = safe_name(name)
        while stem in used:  # two phrases resolving to one class keep both files
            stem += "_"
        used.add(stem)
        files.append(f"{stem}.nii.gz")
    return files


def check_outputs(image: str | Path, out_dir: str | Path, files: list[str]) -> None:
    """Refuse an output that would replace the input scan, or land inside its DICOM folder."""
    source = Path(image).resolve()
    out = Path(out_dir).resolve()
    if source.is_dir() and (out == source or source in out.parents):
        raise ConfigError(f"--output {out_dir} is inside the input DICOM folder {image}; choose another folder")
    for name in [*files, "report.json"]:
        if (out / name).resolve() == source:
            raise ConfigError(f"--output {out_dir} would overwrite the input {image} with {name}; "
                              "choose another output folder")


def warn_if_ct_like(scan: Any, modality: str, image: str | Path) -> bool:
    """Warn when an MRI or PET scan holds air-like Hounsfield units: a CT given the wrong --modality.

    The network is steered by the modality's prompt and normalisation, so a CT run as MRI or PET
    comes out as empty or wrong masks with no error. MRI and PET intensities are not negative
    (beyond small reconstruction noise); a CT's air is about -1000 HU.
    """
    import SimpleITK as sitk

    if modality == "CT":
        return False
    values = sitk.GetArrayViewFromImage(scan)
    sample = values.ravel()[:: max(1, values.size // 1_000_000)]  # a million voxels decide
    if sample.size and float(np.percentile(sample, 5)) < -500.0:
        log.warning("%s: 5 %% of its voxels are below -500, as air is in a CT (Hounsfield units); an %s scan has no "
                    "such values: is --modality %s right?", image, modality, modality)
        return True
    return False


def overlap_notes(names: list[str], predicted: list[int], kept: list[int]) -> list[str]:
    """One line per class that a one-label-per-voxel image shows smaller than it was predicted.

    Classes may overlap (kidney and right kidney, liver and liver tumor); in ``labels.nii.gz`` the
    smaller is drawn over the larger, so the larger keeps only part of its voxels there.
    """
    return [f"labels.nii.gz: '{name}' keeps {kept[k]} of its {predicted[k]} voxels; the rest is drawn as smaller "
            "classes that overlap it (one label per voxel; without --multilabel every class gets its own mask)"
            for k, name in enumerate(names) if kept[k] < predicted[k]]


def write_masks(out: Path, masks: Any, meta: Mapping[str, Any], names: list[str], multilabel: bool) -> list[str]:
    """Restore [K, Z, Y, X] preprocessed-grid masks to the input grid and write them; returns file names.

    ``masks[k]`` is class k (a bool array or ``PackedMasks``); one class is restored at a time, so
    memory holds one full-resolution mask (plus the label map), not K of them.
    """
    import SimpleITK as sitk

    from duplus.atomic import write_json
    from duplus.data.io import write_image
    from duplus.data.restore import restore_to_original
    from duplus.evaluate.packed import PackedMasks

    out.mkdir(parents=True, exist_ok=True)

    def restored(k: int) -> sitk.Image:
        if isinstance(masks, PackedMasks):  # boundary probabilities interpolated where they were kept
            return masks.restored(k, meta)
        return restore_to_original(np.asarray(masks[k], dtype=np.uint8), meta, is_label=True)

    files = output_names(names, multilabel)
    if not multilabel:
        for k, file in enumerate(files):
            write_image(restored(k), out / file)
        return files
    sizes = [int(np.count_nonzero(masks[k])) for k in range(len(names))]
    label, reference, predicted = None, None, [0] * len(names)
    # Larger structures first, so a lesion inside its organ (liver tumor in liver) stays visible.
    for k in sorted(range(len(names)), key=lambda i: -sizes[i]):
        image = restored(k)
        if label is None:
            label = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8 if len(names) < 256 else np.uint16)
            reference = image
        inside = sitk.GetArrayViewFromImage(image) > 0
        predicted[k] = int(np.count_nonzero(inside))
        label[inside] = k + 1
    kept = np.bincount(label.ravel(), minlength=len(names) + 1)[1:]
    for line in overlap_notes(names, predicted, [int(v) for v in kept]):
        log.warning(line)
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(reference)
    write_image(image, out / "labels.nii.gz")
    write_json(out / "labels.json", {"0": "background", **{str(k + 1): name for k, name in enumerate(names)}})
    return ["labels.nii.gz", "labels.json"]

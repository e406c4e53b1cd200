"""The `duplus segment` command line: its options, the mistakes they can hold (answered before torch is
imported), and one scan or many segmented with a one-line answer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from duplus.errors import ConfigError, DataError, DuplusError
from duplus.segment.outputs import FORMATS, OUTPUT_TYPES


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
    from duplus.segment.batch import is_batch_input
    from duplus.segment.outputs import DICOM_OUTPUTS, check_output_folder, output_format

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
    from duplus.segment.batch import is_batch_input
    from duplus.segment.request import load_config

    try:
        check_arguments(args)
        options = dict(region=args.region, sequence=args.sequence, weights=args.weights, sha256=args.sha256,
                       adapter=args.adapter, dataset_classes=args.dataset_classes, multilabel=args.multilabel,
                       device=args.device, prompt_cache=args.prompt_cache,
                       config=_with_fast(args, load_config(args.config)),
                       threshold=args.threshold)
        if is_batch_input(args.input):
            return _run_batch(args, options)
        from duplus.segment.api import segment_image

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
    from duplus.segment.batch import SUMMARY_JSON, find_scans, run_batch
    from duplus.segment.segmenter import Segmenter

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
    """``config`` with ``--fast``'s inference settings when it was given."""
    from duplus.inference.predict import fast_config

    return fast_config(config) if getattr(args, "fast", False) else config

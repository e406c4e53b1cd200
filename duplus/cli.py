"""The `duplus` command: segment a scan with text prompts, list classes and datasets.

`duplus list-classes` and `duplus list-datasets` answer before any model or torch loads.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from duplus import __version__
from duplus.errors import DuplusError


def _list_classes(args: argparse.Namespace) -> int:
    from duplus.data.taxonomy import format_class_table

    if getattr(args, "weights", None):
        from duplus.data.taxonomy import declared_classes
        from duplus.model import read_sidecar, sidecar_path
        from duplus.segment.knowledge import format_trained_on, trained_on, use_model_classes
        from duplus.segment.request import load_config

        sidecar, config = read_sidecar(args.weights), load_config(args.config)
        # The weights' own classes, checked against the config's as `duplus segment` does.
        recorded = use_model_classes([(sidecar, str(sidecar_path(args.weights)))], config)
        declared = [info for info in declared_classes() if info.name in recorded]
        print(format_trained_on(trained_on(sidecar, config), args.weights, declared))
        return 0

    if getattr(args, "config", None):
        from duplus.data.registry import use_declared_classes
        from duplus.segment.request import load_config

        use_declared_classes(load_config(args.config))  # the config's own classes are listed after the built-in ones
    print(format_class_table())
    return 0


def _list_datasets(args: argparse.Namespace) -> int:
    from duplus.data.registry import format_dataset_table

    print(format_dataset_table())
    return 0


def _segment(args: argparse.Namespace) -> int:
    from duplus.segment.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duplus",
        description="DuPLUS: text-prompted universal 3D segmentation for CT, MRI and PET.",
    )
    parser.add_argument("--version", action="version", version=f"duplus {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    classes = commands.add_parser("list-classes", help="canonical classes with region, parent and synonyms")
    classes.add_argument("--weights", default=None, help="list what these model weights were trained on instead")
    classes.add_argument("--config", default=None,
                         help="config declaring datasets and classes of your own (with --weights: default ./config.yaml)")
    classes.set_defaults(func=_list_classes)

    datasets = commands.add_parser("list-datasets", help="built-in datasets with modality, classes and source")
    datasets.set_defaults(func=_list_datasets)

    seg = commands.add_parser(
        "segment",
        help="segment a NIfTI/NRRD/MHA scan or DICOM series with free-text class prompts",
        description="Segment a scan; masks are written on exactly the input grid.",
    )
    from duplus.segment.command import add_arguments

    add_arguments(seg)
    seg.set_defaults(func=_segment)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `duplus list-classes | head`: the reader has gone; stop quietly, as other shell tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # Ctrl-C is the user's own choice, not a failure to debug: one line, and the shell's
        # status for SIGINT (128 + 2). Writes are atomic, so no partial file is left behind.
        print("duplus: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Listing commands must stay instant: answer them before importing the model stack.
    if argv in (["list-classes"], ["list-datasets"]):
        func = _list_classes if argv[0] == "list-classes" else _list_datasets
        try:
            return func(argparse.Namespace())
        except DuplusError as error:
            print(f"duplus: error: {error}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    quiet = bool(getattr(args, "quiet", False)) and not args.verbose
    if quiet:
        os.environ["DUPLUS_NO_PROGRESS"] = "1"
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    if not args.verbose:
        # Other libraries' INFO lines (highdicom's "copy attributes of module ...", numexpr's thread count) are
        # about their own work, not the user's: only their warnings and errors are shown, or everything with -v.
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or record.name.split(".")[0] == "duplus")
    logging.basicConfig(level=level, handlers=[handler])
    try:
        return int(args.func(args) or 0)
    except DuplusError as error:
        print(f"duplus: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

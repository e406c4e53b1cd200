"""What ``duplus segment --fast`` costs in Dice and gains in time, on a trained model's evaluation cases.

Evaluates the same cases (the configured split, as the evaluate rule takes them) with the run's
inference settings and with ``--fast``'s (``duplus.inference.predict.FAST``), through the evaluate
rule's own code, and sets per-class Dice, HD95 and the seconds side by side. The windows a volume
needs at each setting are counted for ``--size`` too, since small demo volumes may need as many
windows at either overlap. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import tempfile
import time

import torch
import yaml

from duplus import __version__
from duplus.evaluate.run import run_evaluate
from duplus.inference.predict import FAST, fast_config, inference_settings
from duplus.inference.stitching import count_windows
from duplus.model import read_sidecar, with_trained_window


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--model", default="results/pretrain/model.safetensors")
    parser.add_argument("--prompts", default="results/prompts/minilm.safetensors")
    parser.add_argument("--manifests", nargs="+", default=None, help="default: data/preprocessed/*/manifest.csv")
    parser.add_argument("--size", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"),
                        help="volume whose window counts are reported beside the demo's")
    parser.add_argument("--overlap", type=float, default=None,
                        help="time this overlap instead of --fast's (to weigh another trade-off)")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.config, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    manifests = args.manifests or sorted(glob.glob("data/preprocessed/*/manifest.csv"))
    runs = {}
    fast = fast_config(config)
    if args.overlap is not None:
        fast["inference"]["overlap"] = args.overlap
    for name, settings in (("default", config), ("fast", fast)):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            frame = run_evaluate(settings, manifests, args.prompts, args.model, out)
        runs[name] = {"seconds": time.perf_counter() - start, "overlap": inference_settings(settings)["overlap"],
                      "frame": frame}
    default, fast = runs["default"]["frame"], runs["fast"]["frame"]
    keys = ["dataset", "case", "class"]
    both = default.merge(fast, on=keys, suffixes=("_default", "_fast"))
    per_class = both.groupby(["dataset", "class"])[["dice_default", "dice_fast"]].mean().reset_index()
    per_class["dice_change"] = per_class["dice_fast"] - per_class["dice_default"]
    window = with_trained_window(config, read_sidecar(args.model))
    roi = inference_settings(window)["roi"]
    result = {
        "script": "bench/fast_settings.py", "fast": {**FAST, "overlap": runs["fast"]["overlap"]}, "model": args.model,
        "cases": int(default["case"].nunique()),
        "classes_scored": len(both),
        "mean_dice": {"default": float(both["dice_default"].mean()), "fast": float(both["dice_fast"].mean())},
        "mean_dice_change": float((both["dice_fast"] - both["dice_default"]).mean()),
        "largest_class_drop": float(per_class["dice_change"].min()),
        "seconds": {name: run["seconds"] for name, run in runs.items()},
        "windows": {"window": list(roi), "volume": list(args.size),
                    "default": count_windows(args.size, roi, runs["default"]["overlap"]),
                    "fast": count_windows(args.size, roi, runs["fast"]["overlap"])},
        "per_class": per_class.to_dict(orient="records"),
        "machine": {"threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
                    "duplus": __version__, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()

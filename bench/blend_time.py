"""Seconds the blending path of ``predict_masks`` adds per window with 1 and with many prompts.

The stand-in network of bench/blend_memory.py (organ-like logits of the real shape, next to no compute)
replaces DuPLUS, and its own seconds are timed apart and taken off: what is left is what blending,
thresholding, packing and the boundary levels cost, the part of the per-prompt cost the network's head
does not explain. Each run is a process of its own; runs of each prompt count (and, with ``--before``,
of older versions of the code, ``--code NAME=DIR``) are interleaved ``--rounds`` times and the fastest is kept, all listed,
with the load averages around each: on a shared machine the slower ones met other jobs. ``--window-seconds``
(one window through the real network with one prompt, e.g. bench/cpu_inference.py's) turns the blending
seconds into the whole volume's ratio of many prompts to one that blending alone would cause. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, nargs=3, default=[64, 128, 128], metavar=("Z", "Y", "X"))
    parser.add_argument("--window", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", default=None,
                        help="a folder holding an older `duplus` package (git archive COMMIT duplus | tar -x -C DIR), "
                             "timed in the same interleaved rounds")
    parser.add_argument("--code", action="append", default=[], metavar="NAME=DIR",
                        help="more older versions to time beside it, each a folder holding a `duplus` package")
    parser.add_argument("--window-seconds", type=float, default=None,
                        help="seconds of one window through the real network with one prompt, on these cores")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: one prompt count
    return parser.parse_args(argv)


def _blend_memory():
    spec = importlib.util.spec_from_file_location("bench_blend_memory", BENCH / "blend_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_child_argv(argv: list[str]) -> list[str]:
    """``argv`` without the options that name other versions of the code (a child runs one)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--before", "--code"):
            skip = True
        elif not arg.startswith(("--before=", "--code=")):
            out.append(arg)
    return out


def run_one(args: argparse.Namespace, prompts: int) -> dict:
    import torch

    from duplus.inference.predict import predict_masks
    from duplus.inference.stitching import count_windows

    torch.set_num_threads(args.threads)
    memory = _blend_memory()
    volume = memory.organ_volume(args.size)
    network = memory.stand_in(prompts)
    forward = network.forward
    spent = [0.0]

    def timed(*inputs):
        start = time.perf_counter()
        out = forward(*inputs)
        spent[0] += time.perf_counter() - start
        return out

    network.forward = timed
    config = {"pretrain": {"patch_size": list(args.window)}, "inference": {"overlap": args.overlap, "sw_batch_size": 1}}
    run = lambda image: predict_masks(network, image, 0, torch.zeros(8), torch.zeros(prompts, 8),  # noqa: E731
                                      config, show_progress=False)
    run(volume[tuple(slice(0, w) for w in args.window)].contiguous())  # untimed, one window: warm-up
    spent[0] = 0.0
    start = time.perf_counter()
    run(volume)
    seconds = time.perf_counter() - start
    windows = count_windows(args.size, args.window, args.overlap)
    return {"prompts": prompts, "seconds": seconds, "network_seconds": spent[0],
            "blending_seconds_per_window": (seconds - spent[0]) / windows}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args, args.one)), flush=True)
        return {}
    versions = {} if args.before is None else {"before": args.before}
    versions.update(dict(code.split("=", 1) for code in args.code))
    versions["this"] = None
    runs: dict[str, dict[int, list[dict]]] = {name: {p: [] for p in args.prompts} for name in versions}
    child_argv = parse_child_argv(argv)
    for _ in range(args.rounds):
        for name, folder in versions.items():
            for prompts in args.prompts:
                env = dict(os.environ)
                path = [str(BENCH.parent)] if folder is None else [str(Path(folder).resolve())]
                env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
                load = os.getloadavg()[0]
                done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *child_argv, "--one", str(prompts)],
                                      stdout=subprocess.PIPE, text=True, env=env)
                run = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                       else {"prompts": prompts, "failed": f"exit {done.returncode}"})
                run.update(load_average_before=load, load_average_after=os.getloadavg()[0])
                runs[name][prompts].append(run)
    summary = {}
    for name, by_prompts in runs.items():
        best = {p: min((r for r in rs if "failed" not in r), key=lambda r: r["blending_seconds_per_window"], default=None)
                for p, rs in by_prompts.items()}
        entry = {str(p): r and r["blending_seconds_per_window"] for p, r in best.items()}
        low, high = min(args.prompts), max(args.prompts)
        if args.window_seconds and best[low] and best[high]:
            # Blending's share of the ratio: the network's head (per prompt) comes on top of this.
            entry["ratio_from_blending"] = ((args.window_seconds + best[high]["blending_seconds_per_window"])
                                            / (args.window_seconds + best[low]["blending_seconds_per_window"]))
        summary[name] = entry
    result = {"script": "bench/blend_time.py", "volume": args.size, "window": args.window, "overlap": args.overlap,
              "threads": args.threads, "window_seconds": args.window_seconds, "before": args.before,
              "code": {name: folder for name, folder in versions.items() if folder is not None},
              "blending_seconds_per_window": summary,
              "runs": {name: {str(p): rs for p, rs in by.items()} for name, by in runs.items()},
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()

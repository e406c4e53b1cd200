"""The dynamic head alone on a CPU: seconds for one 128^3 window's voxels at 1, 8 and 32 prompts.

Paper widths (head_channels 8), no autograd, ``torch.utils.benchmark`` blocks. ``--before FILE`` times an
older ``duplus/model/head.py`` (e.g. ``git show OLD:duplus/model/head.py > /tmp/head_before.py``) beside
this one; ``--budgets`` sweeps the CPU chunk bound ``HIDDEN_ELEMENTS["cpu"]``. Rounds interleave every
variant (on shared cores one timing can swing several-fold); the fastest of each is kept, all are listed
with the load averages. The logits of each variant are checked against the first. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, nargs=3, default=[128, 128, 128], metavar=("Z", "Y", "X"))
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--before", default=None, help="an older duplus/model/head.py to time beside this one")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="HIDDEN_ELEMENTS['cpu'] values for this head (default: the module's own)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per torch.utils.benchmark block")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core usable)")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    return args


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    import torch.utils.benchmark as benchmark

    sys.path.insert(0, str(BENCH.parent))
    from duplus.model import head as this

    torch.set_num_threads(args.threads)
    modules = {}
    if args.before:
        modules["before"] = _load(Path(args.before), "head_before")
    budgets = args.budgets or [this.HIDDEN_ELEMENTS["cpu"]]
    variants = [("before", modules["before"], modules["before"].HIDDEN_ELEMENTS["cpu"])] if args.before else []
    variants += [("this" if len(budgets) == 1 else f"this@{budget}", this, budget) for budget in budgets]
    c = 8  # the paper preset's head_channels
    generator = torch.Generator().manual_seed(0)
    features = torch.randn((1, c, *args.window), generator=generator)
    load_at_start = list(os.getloadavg())
    runs: dict[str, dict[str, list[dict]]] = {}
    logits: dict[str, dict[str, dict]] = {}
    for prompts in args.prompts:
        # Controller-scale parameters: He-scaled weights, as the controller starts them.
        params = torch.randn((1, prompts, 2 * c * c + 3 * c + 1), generator=generator) * (2.0 / c) ** 0.5
        reference = None
        for round_ in range(args.rounds):
            for name, module, budget in variants:
                saved = module.HIDDEN_ELEMENTS["cpu"]
                module.HIDDEN_ELEMENTS["cpu"] = budget
                try:
                    head = module.DynamicHead(c)
                    with torch.no_grad():
                        if round_ == 0:
                            out = head(features, params)
                            if reference is None:
                                reference, first = out, name
                            else:
                                logits.setdefault(str(prompts), {})[name] = {
                                    "against": first, "max_abs_logit_diff": float((out - reference).abs().max()),
                                    "max_abs_logit": float(reference.abs().max()),
                                    "masks_equal": bool(((out > 0) == (reference > 0)).all())}
                            del out
                        load = os.getloadavg()[0]
                        timer = benchmark.Timer("head(features, params)", globals={"head": head, "features": features,
                                                                                    "params": params},
                                                num_threads=args.threads)
                        measured = timer.blocked_autorange(min_run_time=args.min_run_time)
                finally:
                    module.HIDDEN_ELEMENTS["cpu"] = saved
                run = {"seconds": measured.median, "times": len(measured.times), "budget": budget,
                       "load_average_before": load, "load_average_after": os.getloadavg()[0]}
                runs.setdefault(str(prompts), {}).setdefault(name, []).append(run)
                print(f"K={prompts} round {round_} {name}: {run['seconds'] * 1e3:.1f} ms (load {load:.1f})", file=sys.stderr)
    best = {prompts: {name: {**min(tries, key=lambda r: r["seconds"]), "seconds_all_rounds": [r["seconds"] for r in tries]}
                      for name, tries in by_name.items()} for prompts, by_name in runs.items()}
    names = [name for name, _, _ in variants]
    summary = {}
    if str(args.prompts[0]) in best:
        low = str(args.prompts[0])
        for name in names:
            summary[name] = {f"{p}_vs_{low}_prompts": best[p][name]["seconds"] / best[low][name]["seconds"]
                             for p in best if p != low}
    if args.before:
        for p in best:
            fastest = min(names[1:], key=lambda name: best[p][name]["seconds"])
            summary.setdefault("speedup_over_before", {})[p] = {
                "variant": fastest, "times": best["%s" % p]["before"]["seconds"] / best[p][fastest]["seconds"]}
    result = {
        "script": "bench/head_cpu.py", "head_channels": c, "window": args.window, "voxels": features[0, 0].numel(),
        "prompts": args.prompts, "rounds": args.rounds, "note": args.note, "best": best, "summary": summary,
        "logits": logits,
        "machine": {"cpu": platform.processor() or platform.machine(), "kernels": torch.backends.cpu.get_cpu_capability(),
                    "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg()),
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()

"""One window through the network's forward on a CPU: seconds and peak RSS, for two versions of the code and nnU-Net.

Each run is a process of its own, so each peak RSS (VmHWM) is its own. ``--code NAME=DIR`` runs DuPLUS
(paper widths, seeded weights with FiLM switched on) from DIR first on ``PYTHONPATH``, e.g. an older
commit unpacked with ``git archive``; ``nnunet`` runs nnU-Net v2's ResidualEncoderUNet at the same
widths, built as bench/nnunet_predict.py builds it, under ``--nnunet-python``. Rounds interleave the
runs (on a shared machine one timing can swing several-fold); the fastest of each is kept, all are
listed with the load averages. The first code's logits are the reference for the others: max abs
difference and whether the masks (logit > 0) are equal. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, nargs=3, default=[128, 128, 128], metavar=("Z", "Y", "X"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--code", nargs="+", default=[f"this={BENCH.parent}"], metavar="NAME=DIR",
                        help="DuPLUS versions to run; the first is the reference for the logits")
    parser.add_argument("--layouts", nargs="+", default=["ncdhw"], choices=["ncdhw", "ndhwc"],
                        help="memory layouts to run each code in (ndhwc: use_channels_last, as CPU inference runs "
                             "by default); runs in ndhwc are named NAME/ndhwc")
    parser.add_argument("--layout", default="ncdhw", choices=["ncdhw", "ndhwc"], help=argparse.SUPPRESS)
    parser.add_argument("--nnunet-python", default=None, help="python of tools/install_nnunet.sh's venv (none: skipped)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core usable)")
    parser.add_argument("--note", default="")
    parser.add_argument("--child", choices=["duplus", "nnunet"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    return args


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _timed(forward) -> dict:
    """One forward: its seconds, the process's RSS before it and peak RSS (VmHWM) after."""
    rss = _status_mb("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    out = forward()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _status_mb("VmHWM")
    # CPU seconds (all threads) swing less than wall seconds where other jobs share the cores.
    return {"out": out, "seconds": seconds, "cpu_seconds": cpu, "rss_before_mb": rss, "peak_rss_mb": peak,
            "forward_peak_mb": peak - rss}


def child_duplus(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from duplus.model import DuPLUS, ModelConfig, use_channels_last

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DuPLUS(ModelConfig.preset("paper", text_dim=512)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # FiLM generators start at zero output; give them some so that FiLM is exercised
        for film in model.film.values():
            film.out.weight.copy_(0.02 * torch.randn(film.out.weight.shape, generator=generator))
    image = torch.randn((1, 1, *args.window), generator=generator)
    context, targets = torch.randn((1, 512), generator=generator), torch.randn((args.prompts, 512), generator=generator)
    if args.layout == "ndhwc":
        use_channels_last(model)
    with torch.no_grad():
        run = _timed(lambda: model(image, torch.zeros(1, dtype=torch.long), context, targets))
    logits = run.pop("out")
    if args.save:
        np.save(args.save, logits.numpy())
    return {**run, "params": sum(p.numel() for p in model.parameters())}


def child_nnunet(args: argparse.Namespace) -> dict:
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("nnunet_predict", BENCH / "nnunet_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # The paper preset's widths; a pre-activation residual block is two convolutions, as a BasicBlockD.
    plans = module.plans(argparse.Namespace(size=args.window, patch=args.window, features=[32, 64, 128, 256, 320],
                                            blocks=2, decoder_convs=4))
    configuration = PlansManager(plans).get_configuration("3d_fullres")
    network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, 1, args.prompts + 1,
                                     allow_init=True, deep_supervision=False).eval()
    image = torch.randn((1, 1, *args.window))
    with torch.inference_mode():  # as nnUNetPredictor runs it
        run = _timed(lambda: network(image))
    run.pop("out")
    return {**run, "params": sum(p.numel() for p in network.parameters())}


def _run(args: argparse.Namespace, kind: str, python: str, path: str | None, save: str | None,
         layout: str = "ncdhw") -> dict:
    command = [python, str(Path(__file__).resolve()), "--child", kind, "--window", *map(str, args.window),
               "--prompts", str(args.prompts), "--threads", str(args.threads), "--layout", layout]
    if save:
        command += ["--save", save]
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    load = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"failed": f"exit {done.returncode}: {done.stderr.strip()[-600:]}", "load_average_before": load}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_average_before": load,
            "load_average_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        result = child_duplus(args) if args.child == "duplus" else child_nnunet(args)
        print(json.dumps(result), flush=True)
        return result
    import numpy as np
    import torch

    load_at_start = list(os.getloadavg())
    codes = dict(item.split("=", 1) for item in args.code)
    runs: dict[str, list[dict]] = {}
    comparison: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for (name, path), layout in itertools.product(codes.items(), args.layouts):
                name = name if layout == "ncdhw" else f"{name}/{layout}"
                save = str(Path(scratch) / f"{name.replace('/', '-')}.npy") if round_ == 0 else None
                run = _run(args, "duplus", sys.executable, str(Path(path).resolve()), save, layout)
                runs.setdefault(name, []).append(run)
                print(f"round {round_}, {name}: {run.get('seconds', float('nan')):.1f} s, "
                      f"peak {run.get('peak_rss_mb', float('nan')):.0f} MB", file=sys.stderr)
            if args.nnunet_python:
                run = _run(args, "nnunet", args.nnunet_python, None, None)
                runs.setdefault("nnunet", []).append(run)
                print(f"round {round_}, nnunet: {run.get('seconds', float('nan')):.1f} s", file=sys.stderr)
        names = [name if layout == "ncdhw" else f"{name}/{layout}" for name, layout in itertools.product(codes, args.layouts)]
        files = {name: Path(scratch) / f"{name.replace('/', '-')}.npy" for name in names}
        if files[names[0]].exists():
            reference = np.load(files[names[0]])
            for name in names[1:]:
                if files[name].exists():
                    other = np.load(files[name])
                    ours, theirs = other > 0, reference > 0
                    # Untrained weights leave some logits within float rounding of 0 on a 128^3 window,
                    # so a few voxels may flip: how many, and the Dice over all classes.
                    comparison[name] = {"against": names[0], "max_abs_logit_diff": float(np.abs(other - reference).max()),
                                        "masks_equal": bool((ours == theirs).all()),
                                        "mask_voxels_differing": int((ours != theirs).sum()), "mask_voxels": int(ours.size),
                                        "mask_dice": float(2 * (ours & theirs).sum() / max(1, ours.sum() + theirs.sum())),
                                        "logits_within_1e-4_of_zero": int((np.abs(reference) <= 1e-4).sum()),
                                        "max_abs_logit": float(np.abs(reference).max())}
    best = {}
    for name, tries in runs.items():
        timed = [run for run in tries if "seconds" in run]
        best[name] = {**(min(timed, key=lambda run: run["seconds"]) if timed else tries[0]),
                      "seconds_all_rounds": [run.get("seconds") for run in tries],
                      "peak_rss_mb_all_rounds": [run.get("peak_rss_mb") for run in tries]}
    result = {
        "script": "bench/forward_cpu.py", "preset": "paper", "window": args.window, "prompts": args.prompts,
        "codes": codes, "layouts": args.layouts, "rounds": args.rounds, "note": args.note, "best": best, "logits": comparison,
        "machine": {"cpu": platform.processor() or platform.machine(), "kernels": torch.backends.cpu.get_cpu_capability(),
                    "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg()),
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()

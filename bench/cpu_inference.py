"""DuPLUS inference on a CPU beside what the CPU can do and beside nnU-Net v2, in one run on the same cores.

Parts, each in a process of its own (so each peak RSS is its own; ``--in-process`` runs them in this one):
- ``roofline``: every distinct 3-D convolution of one window batch of the network (traced on the meta
  device by bench/roofline.py's recorder), timed alone on real tensors (best of ``--repeats``). Their
  FLOPs over their summed times is the convolution rate this network's own shapes reach on these cores.
- ``window``: one window batch through the whole network (one prompt) per setting tried: thread count,
  ``sw_batch_size``, channels-last, ``torch.compile``, bf16 autocast where the CPU has bf16 instructions;
  seconds per window and share of the roofline rate.
- ``duplus``: ``predict_masks`` (what ``duplus segment`` runs) with each prompt count: seconds per volume,
  peak RSS, FLOP/s and share of the roofline rate.
- ``nnunet``: nnU-Net v2's own predictor (bench/nnunet_predict.py) on a volume of the same size, its
  ResidualEncoderUNet at the same widths, window and overlap, mirroring off and on. It runs under
  ``--nnunet-python`` (default ``.venv-nnunet/bin/python``, made by tools/install_nnunet.sh) and is
  skipped, with a note in the JSON, where that python or nnunetv2 is missing.
Prints one JSON object on stdout (progress on stderr). The load average before and after each part is
recorded: on a shared machine the times are what the cores gave, not what they can do.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as benchmark

from duplus import __version__
from duplus.inference.predict import predict_masks, window_batch
from duplus.inference.stitching import count_windows
from duplus.model import DuPLUS, ModelConfig, count_macs, count_parameters, use_channels_last
from duplus.runtime import peak_rss_mb

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PARTS = ("roofline", "window", "duplus", "nnunet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    parser.add_argument("--size", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"),
                        help="synthetic volume (default: an abdominal CT at the paper's 1.5 mm grid)")
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="window (default 128^3 paper, 64^3 tiny)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core this process may use)")
    parser.add_argument("--sw-batch-size", type=int, default=None,
                        help="window batch of the whole-volume runs (default: what `duplus segment` picks on a CPU)")
    parser.add_argument("--settings", nargs="*", default=None,
                        help="window-part settings to time (default: all): threads-N, batch-N, channels-last, compile, bf16")
    parser.add_argument("--repeats", type=int, default=2, help="timings per convolution shape and setting (best kept)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="whole-volume runs of each kind, interleaved (DuPLUS per prompt count, nnU-Net per mirroring); "
                             "the fastest is kept, all are listed: on a shared machine the slower ones met other jobs")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--nnunet-python", default=str(ROOT / ".venv-nnunet" / "bin" / "python"))
    parser.add_argument("--nnunet-mirroring", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help="nnU-Net runs to make (mirroring: 8 forward passes per window)")
    parser.add_argument("--in-process", action="store_true", help="run every part here (peak RSS: the high-water mark)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (machine load, what was left out)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # a child process runs one part
    parser.add_argument("--prompt-count", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.patch = args.patch or ([128, 128, 128] if args.preset == "paper" else [64, 64, 64])
    args.threads = args.threads or len(os.sched_getaffinity(0))
    width = ModelConfig.preset(args.preset).channels[0]
    args.sw_batch_size = args.sw_batch_size or window_batch(_config(args, None), torch.device("cpu"), width)
    return args


def _config(args: argparse.Namespace, batch: int | None) -> dict:
    return {"pretrain": {"patch_size": list(args.patch)},
            "inference": {"overlap": args.overlap, "sw_batch_size": batch, "blend": "gaussian"}}


def own_peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM): ``getrusage``'s keeps the parent's RSS at fork across exec."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mb()


def _bench_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(args: argparse.Namespace) -> DuPLUS:
    torch.manual_seed(0)
    return DuPLUS(ModelConfig.preset(args.preset, text_dim=512)).eval()


def _best(fn, repeats: int, threads: int) -> float:
    """Seconds per call: the best of ``repeats`` blocks of ``torch.utils.benchmark``'s autorange (each
    block repeats the call for at least 0.2 s, so a short convolution is not timed with the wake-up of
    the thread pool), after one untimed call (kernel selection, allocator warm-up)."""
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return min(min(timer.blocked_autorange(min_run_time=0.2).times) for _ in range(repeats))


# -- parts -------------------------------------------------------------------------------------


def part_roofline(args: argparse.Namespace) -> dict:
    """Each distinct convolution of one window batch, timed alone: the rate these shapes reach here."""
    roofline = _bench_module("roofline")
    cfg = ModelConfig.preset(args.preset, text_dim=512)
    recorder = roofline.record_step(cfg, args.patch, args.sw_batch_size, 1, "inference")
    shapes = []
    for (x, w, bias, stride, padding, dilation, transposed, out_pad, groups), record in recorder.convolutions.items():
        inputs = (torch.randn(x), torch.randn(w), torch.randn(w[1] if transposed else w[0]) if bias else None)

        def run(inputs=inputs, stride=stride, padding=padding, dilation=dilation, transposed=transposed,
                out_pad=out_pad, groups=groups) -> None:
            with torch.no_grad():
                torch.ops.aten.convolution(*inputs, stride, padding, dilation, transposed, out_pad, groups)

        seconds = _best(run, args.repeats, args.threads)
        shapes.append({"input": list(x), "weight": list(w), "stride": list(stride), "calls": record["calls"],
                       "flops_per_call": record["flops"] / record["calls"], "seconds_per_call": seconds,
                       "gflops": record["flops"] / record["calls"] / seconds / 1e9})
        del inputs
    flops = sum(s["flops_per_call"] * s["calls"] for s in shapes)
    seconds = sum(s["seconds_per_call"] * s["calls"] for s in shapes)
    for s in shapes:
        s["share_of_time"] = s["seconds_per_call"] * s["calls"] / seconds
    shapes.sort(key=lambda s: -s["share_of_time"])
    network_flops = 2 * count_macs(cfg, args.patch, 1) * args.sw_batch_size
    return {"distinct_convolutions": len(shapes), "calls": sum(s["calls"] for s in shapes),
            "conv_flops_per_window_batch": flops, "conv_share_of_network_flops": flops / network_flops,
            "seconds_at_measured_rates": seconds, "gflops": flops / seconds / 1e9, "shapes": shapes}


def _bf16_supported() -> bool:
    """bf16 instructions (AVX512-BF16 or AMX): without them autocast emulates bf16, slower than fp32."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def part_window(args: argparse.Namespace) -> dict:
    """One window batch through the whole network (one prompt) per setting: seconds per window."""
    wanted = args.settings if args.settings is not None else (
        [f"threads-{n}" for n in sorted({1, args.threads})] + ["batch-1", "batch-2", "channels-last", "compile", "bf16"])
    cfg = ModelConfig.preset(args.preset, text_dim=512)
    macs = count_macs(cfg, args.patch, 1)
    runs = []
    for setting in wanted:
        name, _, value = setting.partition("-")
        threads = int(value) if name == "threads" else args.threads
        batch = int(value) if name == "batch" else 1
        run: dict[str, Any] = {"setting": setting, "threads": threads, "sw_batch_size": batch}
        if name == "bf16" and not _bf16_supported():
            run["skipped"] = f"no bf16 instructions on this CPU ({torch.backends.cpu.get_cpu_capability()}): not timed"
            runs.append(run)
            continue
        torch.set_num_threads(threads)
        model = _model(args)
        if name == "channels":
            use_channels_last(model)
        image = torch.randn((batch, 1, *args.patch))
        modality = torch.zeros(batch, dtype=torch.long)
        context, targets = torch.randn((batch, 512)), torch.randn((1, 512))
        forward = model
        if name == "compile":
            forward = torch.compile(model, dynamic=False)
            start = time.perf_counter()
            with torch.no_grad():
                forward(image, modality, context, targets)
            run["compile_seconds"] = time.perf_counter() - start

        def step(forward=forward, image=image, modality=modality, context=context, targets=targets,
                 bf16=name == "bf16") -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                forward(image, modality, context, targets)

        seconds = _best(step, args.repeats, threads) / batch
        run.update(seconds_per_window=seconds, gflops=2 * macs / seconds / 1e9)
        runs.append(run)
        print(f"window {setting}: {seconds:.2f} s", file=sys.stderr)
        del model, forward
    torch.set_num_threads(args.threads)
    return {"macs_per_window": macs, "runs": runs}


def part_duplus(args: argparse.Namespace, prompts: int) -> dict:
    """``predict_masks`` on one synthetic volume with ``prompts`` prompts: seconds and peak RSS."""
    model = _model(args)
    config = _config(args, args.sw_batch_size)
    generator = torch.Generator().manual_seed(1)
    volume = torch.randn(args.size, generator=generator)
    context, targets = torch.randn(512, generator=generator), torch.randn((prompts, 512), generator=generator)
    with torch.no_grad():  # one untimed window: allocator and kernel set-up are not charged to the volume
        model(torch.randn((1, 1, *args.patch)), torch.zeros(1, dtype=torch.long), context[None], targets)
    start = time.perf_counter()
    masks = predict_masks(model, volume, "CT", context, targets, config, desc=f"{prompts} prompts")
    seconds = time.perf_counter() - start
    windows = count_windows(args.size, args.patch, args.overlap)
    flops = 2 * count_macs(model.cfg, args.patch, prompts) * windows
    return {"prompts": prompts, "seconds_per_volume": seconds, "peak_rss_mb": own_peak_rss_mb(),
            "masks_mb": masks.nbytes / 2**20, "flops_per_volume": flops, "gflops": flops / seconds / 1e9}


def part_nnunet(args: argparse.Namespace, mirror: bool) -> dict:
    """bench/nnunet_predict.py under the nnU-Net python, or why it did not run."""
    python = Path(args.nnunet_python)
    if not python.exists():
        return {"skipped": f"{python} does not exist: run `bash tools/install_nnunet.sh` (a venv of its own)"}
    cfg = ModelConfig.preset(args.preset, text_dim=512)
    command = [str(python), str(BENCH / "nnunet_predict.py"), "--size", *map(str, args.size),
               "--patch", *map(str, args.patch), "--features", *map(str, cfg.channels),
               # A pre-activation residual block is two convolutions; so is a ResEnc BasicBlockD.
               "--blocks", str(cfg.blocks_per_stage), "--decoder-convs", str(2 * cfg.blocks_per_stage),
               "--classes", str(max(args.prompts)), "--overlap", str(args.overlap), "--threads", str(args.threads)]
    if mirror:
        command.append("--mirror")
    done = subprocess.run(command, capture_output=True, text=True, env=_child_env())
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        return {"skipped": f"nnU-Net's predictor failed (exit {done.returncode}): {done.stderr.strip()[-600:]}"}
    return _last_json(done.stdout)


# -- running the parts -------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _last_json(text: str) -> dict:
    """The JSON object a script printed last (libraries may print lines of their own before it)."""
    start = text.rfind("\n{")
    return json.loads(text[start + 1 :] if start >= 0 else text)


def _run_part(args: argparse.Namespace, argv: list[str], part: str, prompts: int | None = None) -> dict:
    if args.in_process:
        return _part(args, part, prompts)
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", part]
    if prompts is not None:
        command += ["--prompt-count", str(prompts)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=_child_env())
    if done.returncode != 0:
        return {"failed": f"exit {done.returncode}"}
    return _last_json(done.stdout)


def _part(args: argparse.Namespace, part: str, prompts: int | None) -> dict:
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if part == "roofline":
        result = part_roofline(args)
    elif part == "window":
        result = part_window(args)
    else:
        result = part_duplus(args, prompts)
    return {**result, "load_average_before": load, "load_average_after": os.getloadavg()[0]}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.part:  # a child: one part, its JSON on stdout
        print(json.dumps(_part(args, args.part, args.prompt_count)), flush=True)
        return {}
    cfg = ModelConfig.preset(args.preset, text_dim=512)
    windows = count_windows(args.size, args.patch, args.overlap)
    result: dict[str, Any] = {
        "script": "bench/cpu_inference.py", "preset": args.preset, "params": count_parameters(DuPLUS(cfg)),
        "volume": list(args.size), "window": list(args.patch), "overlap": args.overlap,
        "windows_per_volume": windows, "sw_batch_size": args.sw_batch_size, "note": args.note,
        "machine": {"cpu": _cpu_name(), "kernels": torch.backends.cpu.get_cpu_capability(),
                    "cores_usable": len(os.sched_getaffinity(0)), "threads": args.threads,
                    "bf16_instructions": _bf16_supported(), "load_average_at_start": list(os.getloadavg()),
                    "python": platform.python_version(), "torch": torch.__version__, "duplus": __version__,
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    if "roofline" in args.parts:
        result["roofline"] = _run_part(args, argv, "roofline")
        print(f"roofline: {result['roofline'].get('gflops', float('nan')):.1f} GFLOP/s", file=sys.stderr)
    rate = result.get("roofline", {}).get("gflops")
    if "window" in args.parts:
        # Not under "window", which is the window's size (an earlier version of this script put it there).
        result["window_settings"] = _run_part(args, argv, "window")
        for run in result["window_settings"].get("runs", []):
            if rate and "gflops" in run and run["threads"] == args.threads:  # the roofline ran on args.threads
                run["share_of_roofline"] = run["gflops"] / rate
    volumes: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for prompts in sorted(args.prompts) if "duplus" in args.parts else ():
            run = _run_part(args, argv, "duplus", prompts)
            volumes.setdefault(("duplus", prompts), []).append(run)
            print(f"duplus, {prompts} prompts: {run.get('seconds_per_volume', float('nan')):.1f} s", file=sys.stderr)
        for mirror in args.nnunet_mirroring if "nnunet" in args.parts else ():
            run = {"mirroring": mirror == "on", **part_nnunet(args, mirror == "on")}
            volumes.setdefault(("nnunet", mirror), []).append(run)
    for (kind, _), runs in volumes.items():
        timed = [run for run in runs if "seconds_per_volume" in run]
        best = dict(min(timed, key=lambda run: run["seconds_per_volume"]) if timed else runs[0])
        best["seconds_all_rounds"] = [run.get("seconds_per_volume") for run in runs]
        if kind == "duplus" and rate and "gflops" in best:
            best["share_of_roofline"] = best["gflops"] / rate
        result.setdefault(kind, []).append(best)
    result["summary"] = summary(result)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    print(json.dumps(result, indent=2), flush=True)
    return result


def summary(result: dict) -> dict:
    """The issue's questions answered from the parts that ran (None where a part is missing)."""
    runs = {run["prompts"]: run for run in result.get("duplus", []) if "seconds_per_volume" in run}
    nnunet = {run["mirroring"]: run for run in result.get("nnunet", []) if "seconds_per_volume" in run}
    fewest, most = (runs[min(runs)], runs[max(runs)]) if runs else (None, None)
    windows = [run for run in result.get("window_settings", {}).get("runs", []) if "seconds_per_window" in run]
    fastest = min(windows, key=lambda run: run["seconds_per_window"]) if windows else None
    return {
        "roofline_gflops": result.get("roofline", {}).get("gflops"),
        "fastest_window_setting": fastest and fastest["setting"],
        "backbone_share_of_roofline": fastest and fastest.get("share_of_roofline"),
        "volume_share_of_roofline": {str(k): run.get("share_of_roofline") for k, run in runs.items()},
        "most_vs_fewest_prompts_time": most["seconds_per_volume"] / fewest["seconds_per_volume"] if runs else None,
        "peak_rss_mb_most_prompts": most and most["peak_rss_mb"],
        "nnunet_vs_duplus_one_prompt": {("mirroring" if mirror else "no_mirroring"): run["seconds_per_volume"] /
                                        fewest["seconds_per_volume"] for mirror, run in nnunet.items()} if fewest else {},
    }


if __name__ == "__main__":
    main()

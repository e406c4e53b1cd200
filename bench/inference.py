"""Inference cost of DuPLUS: seconds and peak memory per volume for 1, 8 and 32 prompts, plus MACs.

Runs what ``duplus segment`` runs (``predict_masks``: streaming Gaussian blending, thresholded slabs).
Prompt counts run in increasing order, so each run's peak RSS is the process high-water mark so far:
the last (largest) one is the figure to compare with a memory budget.
Prints one JSON object on stdout (progress on stderr). Untrained weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time

import torch

from duplus import __version__
from duplus.inference.predict import count_windows, predict_masks
from duplus.model import DuPLUS, ModelConfig, count_macs, count_parameters, use_channels_last
from duplus.runtime import configure_kernels, peak_rss_mb, resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"),
                        help="synthetic volume (default 300 x 512 x 512: an abdominal CT at the paper's size)")
    parser.add_argument("--preset", default="paper", choices=["paper", "tiny"])
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="window (default 128^3 paper, 32^3 tiny)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32], help="prompt counts to time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--text-dim", type=int, default=512, help="prompt embedding width (512: ClipMD)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--channels-last", action="store_true", help="run the network in NDHWC layout")
    return parser.parse_args(argv)


STOPPED = "not run: time limit (SIGTERM)"


class TimeLimit(BaseException):
    """SIGTERM arrived (a BaseException, so that no ``except Exception`` on the way swallows it)."""


def _stop_on_term(signum, frame) -> None:
    raise TimeLimit()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _window_batch_seconds(model: DuPLUS, device: torch.device, patch: list[int], batch: int, k: int) -> float:
    """Best of 3 timings of one window batch (after a warm-up run)."""
    image = torch.randn((batch, 1, *patch), device=device)
    modality = torch.zeros(batch, dtype=torch.long, device=device)
    context = torch.randn((batch, model.cfg.text_dim), device=device)
    targets = torch.randn((k, model.cfg.text_dim), device=device)
    best = float("inf")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    for _ in range(4):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            model(image, modality, context, targets)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _head_seconds(model: DuPLUS, device: torch.device, patch: list[int], batch: int, k: int) -> float:
    """Best of 3: the per-prompt work of one window batch alone (dynamic head, sigmoid, blend weights).

    Whole-window timings on a shared CPU swing by more than this part costs; backbone + head(K)
    over backbone + head(1) from these numbers is the steadier class-scaling estimate.
    """
    # In the precision the real windows run in (bf16 autocast on a GPU), so the head's share is
    # not overstated next to the bf16 window timings it is combined with.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    features = torch.randn((batch, model.cfg.head_channels, *patch), device=device, dtype=dtype)
    params = torch.randn((batch, k, sum(model.head.splits)), device=device)
    weight = torch.rand(patch, device=device)
    best = float("inf")
    for _ in range(4):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            torch.sigmoid(model.head(features, params).float()) * weight
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    configure_kernels(device)  # as the pipeline runs (deterministic: false)
    patch = args.patch or ([128, 128, 128] if args.preset == "paper" else [32, 32, 32])
    cfg = ModelConfig.preset(args.preset, text_dim=args.text_dim)
    model = DuPLUS(cfg).to(device).eval()
    if args.channels_last:
        use_channels_last(model)
    config = {"pretrain": {"patch_size": patch},
              "inference": {"overlap": args.overlap, "sw_batch_size": args.sw_batch_size, "blend": "gaussian"}}
    volume = torch.randn(args.size)
    many_k = max(8, max(args.prompts))
    runs: list[dict] = []
    window: dict[str, float] = {}
    # A time limit (SIGTERM, as `timeout` sends) stops the measurement; the prompt counts timed so
    # far are still printed, so a suite cut short keeps the volume timings it has.
    previous = signal.signal(signal.SIGTERM, _stop_on_term)
    stopped = None
    try:
        # One untimed window batch first: CUDA start-up and cuDNN's per-shape kernel search
        # (cudnn.benchmark) would otherwise be charged to the first prompt count, memory included.
        _window_batch_seconds(model, device, patch, args.sw_batch_size, 1)
        for k in sorted(args.prompts):
            runs.append(_volume_run(model, device, volume, cfg, config, k))
            print(f"{k} prompts: {runs[-1]['seconds_per_volume']:.1f} s", file=sys.stderr)
        window["one"] = _window_batch_seconds(model, device, patch, args.sw_batch_size, 1)
        window["many"] = _window_batch_seconds(model, device, patch, args.sw_batch_size, many_k)
        window["head_one"] = _head_seconds(model, device, patch, args.sw_batch_size, 1)
        window["head_many"] = _head_seconds(model, device, patch, args.sw_batch_size, many_k)
    except TimeLimit:
        stopped = STOPPED
    finally:
        # A second SIGTERM must not kill the process while it writes what it measured.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    one, many = window.get("one"), window.get("many")
    head_one, head_many = window.get("head_one"), window.get("head_many")
    complete = stopped is None
    result = {
        "script": "bench/inference.py",
        "preset": args.preset,
        "channels_last": args.channels_last,
        "volume": list(args.size),
        "window": patch,
        "windows_per_volume": count_windows(args.size, patch, args.overlap),
        "sw_batch_size": args.sw_batch_size,
        "params": count_parameters(model),
        "macs_per_window": count_macs(cfg, patch, 1),
        "macs_per_window_per_extra_prompt": count_macs(cfg, patch, 2) - count_macs(cfg, patch, 1),
        "runs": runs,
        "class_scaling_ratio": many / one if complete else None,
        "class_scaling_k": many_k,
        "window_batch_seconds": {"1": one, str(many_k): many},
        "head_seconds_per_window_batch": {"1": head_one, str(many_k): head_many},
        "class_scaling_ratio_from_head": (one + head_many - head_one) / one if complete else None,
        # Whole volume (windows + blending + thresholding): the largest prompt count vs the smallest.
        "volume_class_scaling_ratio": runs[-1]["seconds_per_volume"] / runs[0]["seconds_per_volume"] if len(runs) > 1 else None,
        "machine": {
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "duplus": __version__,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    if stopped:
        result["stopped"] = f"{stopped}; prompt counts not timed: {sorted(args.prompts)[len(runs):]}"
    print(json.dumps(result, indent=2), flush=True)
    signal.signal(signal.SIGTERM, previous)
    return result


def _volume_run(model: DuPLUS, device: torch.device, volume: torch.Tensor, cfg: ModelConfig, config: dict,
                k: int) -> dict:
    """One whole volume with ``k`` prompts through ``predict_masks``: seconds and peak memory."""
    targets = torch.randn(k, cfg.text_dim)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    predict_masks(model, volume, "CT", torch.randn(cfg.text_dim), targets, config, desc=f"{k} prompts")
    _sync(device)
    run = {"prompts": k, "seconds_per_volume": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        run["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return run


if __name__ == "__main__":
    main()

"""Training-step throughput of DuPLUS: samples/s and achieved TFLOP/s, eager vs compiled, fp32 vs bf16,
default vs channels-last layout, at one or more batch sizes.

Prints one JSON object on stdout. Synthetic inputs and untrained weights: speed does not depend on them.
TFLOP/s counts 3 x forward multiply-adds x 2 FLOPs (forward + backward ~ 3 forwards). On a GPU with a
known dense bf16 peak the summary gives the best run's share of it and its speed-up over eager fp32.
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
from duplus.model import DuPLUS, ModelConfig, count_macs, count_parameters, use_channels_last
from duplus.runtime import configure_kernels, peak_rss_mb, resolve_device
from duplus.train.losses import masked_loss
from duplus.train.optim import GRAD_CLIP, autocast, build_optimizer

PRESETS = {"tiny": {"patch": [32, 32, 32], "batch": 2}, "paper": {"patch": [128, 128, 128], "batch": 2}}
VARIANTS = ["eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16", "eager-fp32-cl", "eager-bf16-cl",
            "compiled-bf16-cl"]

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched
# against torch.cuda.get_device_name().
# The first key contained in the device name wins: the NVL and PCIe variants come before the SXM ones.
BF16_PEAK_TFLOPS = {"H200 NVL": 835.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4, "H100": 989.4,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"))
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="one or more batch sizes")
    parser.add_argument("--classes", type=int, default=8, help="target prompts per sample")
    parser.add_argument("--text-dim", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"subset of {' '.join(VARIANTS)} (-cl: channels-last; bf16/compile: CUDA only)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", nargs="*", default=[], metavar="VARIANT",
                        help="after timing these variants, profile two more steps: where the time goes, by kernel")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variant(cfg: ModelConfig, device: torch.device, name: str, patch: list[int], batch: int, k: int,
             steps: int, warmup: int, profiled: bool = False) -> dict:
    compiled, precision, *layout = name.split("-")
    torch.manual_seed(0)
    model = DuPLUS(cfg).to(device).train()
    if layout == ["cl"]:
        use_channels_last(model)
    optimizer = build_optimizer(model.parameters(), 1e-4, 3e-5, device)
    if compiled == "compiled":
        # Every compiled variant starts from a clean compiler state with static shapes: dynamo
        # keeps per-function state across models, so a second variant in the same process (another
        # batch size or layout) would otherwise be compiled with symbolic sizes or strides, which
        # is not what a training run of fixed patches compiles.
        torch._dynamo.reset()
        forward = torch.compile(model, dynamic=False)
    else:
        forward = model
    amp = torch.bfloat16 if precision == "bf16" else None
    image = torch.randn((batch, 1, *patch), device=device)
    modality = torch.zeros(batch, dtype=torch.long)  # on the host, as the training loop passes it
    context = torch.randn((batch, cfg.text_dim), device=device)
    targets = torch.randn((batch, k, cfg.text_dim), device=device)
    truth = (torch.rand((batch, k, *patch), device=device) > 0.9).float()
    weight = torch.ones((batch, k), device=device)

    def step() -> None:
        with autocast(device, amp):
            logits = forward(image, modality, context, targets)
        masked_loss(logits, truth, weight).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_seconds = time.perf_counter() - started
    warmup_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    if device.type == "cuda":  # steady training memory, without cuDNN's search scratch or autotuning
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - started) / steps
    result = {"variant": name, "batch": batch, "seconds_per_step": seconds, "samples_per_s": batch / seconds,
              "warmup_seconds": warmup_seconds, "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_gpu_mb_warmup"] = warmup_peak
    if profiled:
        try:
            result["profile"] = profile_steps(step, device, PROFILED_STEPS)
        except Exception as error:  # noqa: BLE001 - a profiler that cannot start must not cost the timing
            result["profile"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        except TimeLimit:
            # The limit came during the profile: the timing above is complete and is kept.
            result["profile"] = {"error": STOPPED}
            raise TimeLimit(result) from None
    return result


PROFILED_STEPS = 2
STOPPED = "not run: time limit (SIGTERM)"


class TimeLimit(BaseException):
    """SIGTERM arrived: stop timing, report what was measured (a BaseException, so that no
    ``except Exception`` around a variant or its profile swallows it). Its argument, if any, is
    the run of the variant in progress when its timing was already complete."""


def _stop_on_term(signum, frame) -> None:
    raise TimeLimit()

# Kernel (GPU) or operator (CPU) names -> what they do; the first matching rule wins. The
# categories test where a step's time goes: tensor-core convolutions, layout transposes around
# them, normalisations, fused elementwise code, the optimizer.
KERNEL_CATEGORIES = [
    ("fused (compiled)", ("triton",)),
    # The decoder's trilinear upsampling (its backward adds with atomics) and skip concatenation:
    # unfused full-resolution passes that would otherwise hide under "other".
    ("upsampling", ("upsample",)),
    ("concatenation", ("catarray", "aten::cat")),
    # Layout kernels by name only: a generic copy kernel is mostly autocast's dtype casts.
    ("layout transpose", ("nchwtonhwc", "nhwctonchw", "transpose", "permute", "aten::contiguous", "aten::clone")),
    ("optimizer", ("adam", "multi_tensor_apply", "foreach_")),
    ("gradient clipping", ("lpnorm", "aten::norm", "clip_grad")),
    ("normalisation", ("norm", "bn_fw", "bn_bw", "var_mean", "welford")),
    # Convolution kernels by their own marks first, then cuBLAS gemms (the dynamic head, linear
    # layers), then any other tensor-core kernel.
    ("convolution", ("conv", "implicit_gemm", "implicit_precomp", "wgrad", "dgrad", "fprop", "winograd", "im2col",
                     "cudnn")),
    ("matmul", ("gemm", "gemv", "bmm", "addmm", "aten::mm", "aten::linear")),
    ("convolution", ("xmma", "cutlass")),
    ("dtype cast", ("copy_", "to_copy", "direct_copy")),
    ("elementwise", ("elementwise", "elu", "add", "mul", "sigmoid", "threshold", "reduce", "sum", "fill", "where")),
]


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(needle in lowered for needle in needles):
            return category
    return "other"


def profile_steps(step, device: torch.device, n_steps: int, top: int = 15) -> dict:
    """Self time per GPU kernel (per CPU operator on a CPU) over ``n_steps`` steps, per step.

    Returns ``ms_per_step`` (the profiled total), ``by_category`` and the ``top`` costliest
    kernels with their share: enough to tell convolution kernels from transposes and norms.
    """
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        for _ in range(n_steps):
            step()
        _sync(device)
    rows = []
    for event in profiler.key_averages():
        if on_gpu:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            self_us = event.self_device_time_total
        else:
            self_us = event.self_cpu_time_total
        if self_us > 0:
            rows.append({"name": event.key[:160], "ms_per_step": self_us / 1e3 / n_steps,
                         "calls_per_step": event.count / n_steps, "category": kernel_category(event.key)})
    total = sum(row["ms_per_step"] for row in rows) or 1.0
    categories: dict[str, float] = {}
    for row in rows:
        row["share"] = row["ms_per_step"] / total
        categories[row["category"]] = categories.get(row["category"], 0.0) + row["ms_per_step"]
    rows.sort(key=lambda row: -row["ms_per_step"])
    return {"what": "GPU kernel self time" if on_gpu else "CPU operator self time", "ms_per_step": total,
            "by_category": {name: {"ms_per_step": ms, "share": ms / total}
                            for name, ms in sorted(categories.items(), key=lambda item: -item[1])},
            "top": rows[:top]}


def bf16_peak(device_name: str | None) -> float | None:
    """Dense bf16 peak TFLOP/s of a known GPU (None for CPUs and GPUs not in the table)."""
    if not device_name:
        return None
    matches = [peak for key, peak in BF16_PEAK_TFLOPS.items() if key in device_name]
    return matches[0] if matches else None


def summarize(runs: list[dict], device_name: str | None) -> dict:
    """Fastest run, its speed-up over the fastest eager fp32 run and its share of the bf16 peak."""
    timed = [run for run in runs if "samples_per_s" in run]
    if not timed:
        return {}
    best = max(timed, key=lambda run: run["samples_per_s"])
    summary = {"fastest": f"{best['variant']} at batch {best['batch']}", "fastest_tflops": best["achieved_tflops"]}
    baseline = [run["samples_per_s"] for run in timed if run["variant"] == "eager-fp32"]
    if baseline:
        summary["speedup_vs_eager_fp32"] = best["samples_per_s"] / max(baseline)
    peak = bf16_peak(device_name)
    if peak:
        summary["bf16_peak_tflops"] = peak
        summary["share_of_bf16_peak"] = best["achieved_tflops"] / peak
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    configure_kernels(device)  # as the pipeline runs (deterministic: false)
    patch = args.patch or PRESETS[args.preset]["patch"]
    batches = args.batch or [PRESETS[args.preset]["batch"]]
    steps = args.steps or (10 if device.type == "cuda" else 3)
    cfg = ModelConfig.preset(args.preset, text_dim=args.text_dim)
    variants = args.variants or (VARIANTS if device.type == "cuda" else ["eager-fp32", "eager-fp32-cl"])
    unknown = sorted((set(variants) | set(args.profile)) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {VARIANTS}")
    macs = count_macs(cfg, patch, args.classes)
    flops_per_sample = 3 * 2 * macs
    params = count_parameters(DuPLUS(cfg))  # before the timing: a limit after it must find nothing left to do
    planned = [(name, batch) for batch in batches for name in variants]
    runs = []
    # A time limit (SIGTERM, as `timeout` sends) ends the current variant; the JSON of the runs
    # done so far is still printed, so a suite cut short keeps what it measured.
    previous = signal.signal(signal.SIGTERM, _stop_on_term)
    try:
        for name, batch in planned:
            print(f"timing {name} at batch {batch} ...", file=sys.stderr)
            try:
                run = _variant(cfg, device, name, patch, batch, args.classes, steps, args.warmup,
                               profiled=name in args.profile)
            except TimeLimit as limit:
                if limit.args:  # timed, then stopped in its profile
                    _add_tflops(limit.args[0], flops_per_sample)
                    runs.append(limit.args[0])
                raise
            except Exception as error:  # noqa: BLE001 - one failing variant (OOM, no compiler) must not hide the others
                run = {"variant": name, "batch": batch,
                       "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            runs.append(_add_tflops(run, flops_per_sample))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except TimeLimit:  # in a variant or between two: the rest are marked, the output still written
        pass
    finally:
        # A second SIGTERM must not kill the process while it writes what it measured.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    runs += [{"variant": name, "batch": batch, "error": STOPPED} for name, batch in planned[len(runs):]]
    result = {
        "script": "bench/train_step.py",
        "preset": args.preset,
        "patch": patch,
        "batch": batches,
        "classes": args.classes,
        "params": params,
        "macs_per_sample_forward": macs,
        "flops_per_sample_train": flops_per_sample,
        "timed_steps": steps,
        "runs": runs,
        "summary": summarize(runs, torch.cuda.get_device_name(device) if device.type == "cuda" else None),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "duplus": __version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        },
    }
    print(json.dumps(result, indent=2), flush=True)
    signal.signal(signal.SIGTERM, previous)
    return result


def _add_tflops(run: dict, flops_per_sample: int) -> dict:
    if "samples_per_s" in run:
        run["achieved_tflops"] = run["samples_per_s"] * flops_per_sample / 1e12
    return run


if __name__ == "__main__":
    main()

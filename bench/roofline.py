"""Roofline of one DuPLUS training step (or inference window): what a GPU could do at best.

Runs the step on torch's ``meta`` device (no compute, any size, no GPU needed) and records every
ATen operation it dispatches: FLOPs (torch's own formulas, as ``FlopCounterMode`` counts them)
and the bytes its tensor arguments and results occupy. Each operation's time can be no shorter
than its FLOPs at the GPU's dense bf16 peak, nor than its bytes at the GPU's memory bandwidth.

Three bounds, from loose to tight:
- ``matmul_at_peak_ms``: convolutions and matrix products at peak, everything else free;
- ``fused_ms``: plus one read and one write of each activation map per normalisation/activation
  (what a perfect fusing compiler would still move);
- ``unfused_ms``: every operation at its own roofline, as eager PyTorch dispatches them.

Dividing the step's FLOPs by a bound gives the highest share of the peak that bound allows; with
``--compare train_step.json`` the measured step is set against them, which says whether the time
goes to the convolution kernels (a measured step far above ``matmul_at_peak_ms``) or to memory
traffic. Activations are modelled in bf16 (autocast runs convolutions and instance norms in bf16),
the optimizer (fused AdamW, fp32 state) and the gradient clip are added analytically.

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from duplus import __version__
from duplus.model import DuPLUS, ModelConfig, count_macs, count_parameters
from duplus.train.losses import masked_loss

# Dense bf16 tensor-core peak (TFLOP/s) and memory bandwidth (TB/s), from the vendors' data sheets.
GPUS = {"h100-sxm": (989.4, 3.35), "h200": (989.4, 4.8), "h100-pcie": (756.0, 2.0), "h100-nvl": (835.0, 3.9),
        "h200-nvl": (835.0, 4.8), "a100-80gb": (312.0, 2.039), "l40s": (362.0, 0.864)}
MATMUL_OPS = {"convolution", "convolution_backward", "mm", "addmm", "bmm", "baddbmm"}
# Operations that only re-describe memory (or allocate it): no traffic of their own.
NO_TRAFFIC_OPS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
                  "slice", "select", "as_strided", "alias", "detach", "empty", "empty_like", "empty_strided",
                  "lift_fresh", "_to_copy_meta_noop"}
# bytes per parameter per step: fused AdamW reads param, grad, exp_avg, exp_avg_sq and writes three
# (fp32: 7 x 4); clipping reads the gradients for their norm and rescales them in place (3 x 4).
OPTIMIZER_BYTES_PER_PARAM = 7 * 4 + 3 * 4


def detect_gpu() -> str:
    """The table key of this machine's GPU (h100-sxm when there is none or it is unknown)."""
    if not torch.cuda.is_available():
        return "h100-sxm"
    name = torch.cuda.get_device_name().upper()
    for key, needle in (("h200-nvl", "H200 NVL"), ("h100-nvl", "H100 NVL"), ("h200", "H200"),
                        ("h100-pcie", "H100 PCIE"), ("h100-sxm", "H100"), ("a100-80gb", "A100"), ("l40s", "L40S")):
        if needle in name:
            return key
    return "h100-sxm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=["tiny", "paper"])
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128], metavar=("Z", "Y", "X"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=8, help="target prompts per sample")
    parser.add_argument("--mode", choices=["train", "inference"], default="train",
                        help="train: forward, loss, backward, optimizer; inference: one forward under no_grad")
    parser.add_argument("--gpu", choices=["auto", *sorted(GPUS)], default="auto",
                        help="auto: this machine's GPU where it is in the table, else h100-sxm")
    parser.add_argument("--compare", default=None, metavar="TRAIN_STEP_JSON",
                        help="a bench/train_step.py result: set its runs at this batch against the bounds")
    parser.add_argument("--top", type=int, default=12, help="operations listed, costliest first")
    return parser.parse_args(argv)


class TrafficRecorder(TorchDispatchMode):
    """Per ATen operation: calls, FLOPs and bytes touched, split by the resolution it works at; and each
    distinct convolution (its ``aten.convolution`` arguments, shapes for tensors) with its calls and FLOPs,
    so that a CPU can time the network's own convolution shapes (bench/cpu_inference.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "flops": 0, "bytes": 0})
        self.levels: dict[int, dict[str, float]] = defaultdict(lambda: {"matmul_flops": 0, "other_bytes": 0})
        self.convolutions: dict[tuple, dict[str, float]] = defaultdict(lambda: {"calls": 0, "flops": 0})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name in NO_TRAFFIC_OPS:
            return out
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        tensors = _unique_tensors((args, kwargs, out))
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        record = self.ops[name]
        record["calls"] += 1
        record["flops"] += flops
        record["bytes"] += nbytes
        if name == "convolution":
            x, w, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
            key = (tuple(x.shape), tuple(w.shape), bias is not None, tuple(stride), tuple(padding), tuple(dilation),
                   bool(transposed), tuple(output_padding), int(groups))
            self.convolutions[key]["calls"] += 1
            self.convolutions[key]["flops"] += flops
        level = max((math.prod(t.shape[2:]) for t in tensors if t.dim() == 5), default=0)
        if name in MATMUL_OPS:
            self.levels[level]["matmul_flops"] += flops
        else:
            self.levels[level]["other_bytes"] += nbytes
        return out


def _unique_tensors(tree) -> list[torch.Tensor]:
    seen: set[int] = set()
    tensors = []
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and id(leaf) not in seen:
            seen.add(id(leaf))
            tensors.append(leaf)
    return tensors


def record_step(cfg: ModelConfig, patch: list[int], batch: int, classes: int, mode: str) -> TrafficRecorder:
    """Dispatch one step of the real network and loss on meta tensors, recording its traffic."""
    dtype = torch.bfloat16
    with torch.device("meta"):
        net = DuPLUS(cfg).to(dtype).train(mode == "train")
        image = torch.empty((batch, 1, *patch), dtype=dtype)
        context = torch.empty((batch, cfg.text_dim), dtype=dtype)
        targets = torch.empty((batch, classes, cfg.text_dim), dtype=dtype)
        truth = torch.empty((batch, classes, *patch), dtype=torch.uint8)
        weight = torch.ones((batch, classes))
    modality = torch.zeros(batch, dtype=torch.long)  # on the host, as the training loop passes it
    recorder = TrafficRecorder()
    with recorder:
        if mode == "train":
            masked_loss(net(image, modality, context, targets), truth, weight).backward()
        else:
            with torch.no_grad():
                net(image, modality, context, targets).sigmoid()
    return recorder


def _ms(flops: float, nbytes: float, peak_tflops: float, tb_per_s: float) -> float:
    return max(flops / (peak_tflops * 1e9), nbytes / (tb_per_s * 1e9))


def bounds(recorder: TrafficRecorder, extra_bytes: float, peak: float, bandwidth: float) -> dict[str, float]:
    """The three step-time bounds (ms) described in the module docstring."""
    matmul = [r for name, r in recorder.ops.items() if name in MATMUL_OPS]
    matmul_ms = sum(_ms(r["flops"], r["bytes"], peak, bandwidth) for r in matmul)
    unfused_ms = sum(_ms(r["flops"], r["bytes"], peak, bandwidth) for r in recorder.ops.values())
    # A fused chain still reads its input map and writes its output map once per normalisation
    # (forward and backward alike): count the normalisations' own bytes, nothing downstream of them.
    norm_bytes = sum(r["bytes"] for name, r in recorder.ops.items() if "norm" in name)
    fused_ms = matmul_ms + norm_bytes / (bandwidth * 1e9)
    extra_ms = extra_bytes / (bandwidth * 1e9)
    return {"matmul_at_peak_ms": matmul_ms + extra_ms, "fused_ms": fused_ms + extra_ms,
            "unfused_ms": unfused_ms + extra_ms}


def compare(path: str, batch: int, flops_per_step: float, limits: dict[str, float]) -> list[dict]:
    """Each measured run of ``path`` at ``batch``: its step time and how far it sits above each bound."""
    if not os.path.exists(path):
        print(f"roofline: {path} does not exist; nothing measured to compare", file=sys.stderr)
        return []
    with open(path, encoding="utf-8") as handle:
        measured = json.load(handle)
    rows = []
    for run in measured.get("runs", []):
        if "seconds_per_step" not in run or run.get("batch", measured.get("batch")) != batch:
            continue
        ms = run["seconds_per_step"] * 1e3
        rows.append({"variant": run["variant"], "measured_ms": ms,
                     "achieved_tflops": flops_per_step / (ms * 1e9),
                     **{f"x_{name.removesuffix('_ms')}": ms / bound for name, bound in limits.items()}})
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = ModelConfig.preset(args.preset)
    gpu = detect_gpu() if args.gpu == "auto" else args.gpu
    peak, bandwidth = GPUS[gpu]
    started = time.perf_counter()
    recorder = record_step(cfg, args.patch, args.batch, args.classes, args.mode)
    params = count_parameters(DuPLUS(cfg))
    extra_bytes = params * OPTIMIZER_BYTES_PER_PARAM if args.mode == "train" else 0
    flops = sum(r["flops"] for r in recorder.ops.values())
    limits = bounds(recorder, extra_bytes, peak, bandwidth)
    forward_macs = count_macs(cfg, args.patch, args.classes) * args.batch
    ops = sorted(({"op": name, **r, "roofline_ms": _ms(r["flops"], r["bytes"], peak, bandwidth)}
                  for name, r in recorder.ops.items()), key=lambda r: -r["roofline_ms"])
    result = {
        "script": "bench/roofline.py",
        "mode": args.mode, "preset": args.preset, "patch": args.patch, "batch": args.batch, "classes": args.classes,
        "gpu": {"name": gpu, "bf16_peak_tflops": peak, "memory_tb_per_s": bandwidth},
        "params": params,
        "flops_per_step": flops,
        # The benchmarks' TFLOP/s use 3 x 2 x forward multiply-adds per training sample; the traced
        # count should agree (the first convolution needs no input gradient, so it is a bit lower).
        "flops_counted_by_benchmarks": (6 if args.mode == "train" else 2) * forward_macs,
        "bytes_per_step_unfused": sum(r["bytes"] for r in recorder.ops.values()) + extra_bytes,
        "optimizer_bytes": extra_bytes,
        "bounds_ms": limits,
        "max_share_of_peak": {name.removesuffix("_ms"): flops / (ms * 1e-3) / (peak * 1e12)
                              for name, ms in limits.items()},
        "step_ms_for_25pct_of_peak": flops / (0.25 * peak * 1e12) * 1e3,
        "by_resolution": [
            {"voxels": level, "side": round(level ** (1 / 3), 1), "matmul_tflop": r["matmul_flops"] / 1e12,
             "matmul_ms_at_peak": r["matmul_flops"] / (peak * 1e9),
             "other_gb": r["other_bytes"] / 1e9, "other_ms_at_bandwidth": r["other_bytes"] / (bandwidth * 1e9)}
            for level, r in sorted(recorder.levels.items(), reverse=True) if level > 0],
        "top_ops": ops[: args.top],
        "machine": {"traced_on": "meta device (no compute)", "torch": torch.__version__, "duplus": __version__,
                    "python": platform.python_version(), "trace_seconds": time.perf_counter() - started,
                    "date": time.strftime("%Y-%m-%d")},
    }
    if args.compare:
        result["measured"] = compare(args.compare, args.batch, flops, limits)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Peak memory of the blending path of ``predict_masks`` at full size, in minutes instead of hours.

A stand-in network replaces DuPLUS: it returns organ-like logits of the real shape [n, K, window]
(class k is where a smooth random field exceeds its k-th level, so masks have organ-sized regions
and thin boundaries) and holds no activations of its own. What is measured is then what blending,
thresholding, packing and the boundary levels hold beside the network; the network's own forward
adds its activations on top (bench/inference.py measures the whole), or ``--forward-mb`` stands in for
them: each window's forward then also fills that many MB (less its logits) and frees them before it
returns, as the real forward does (``bench/forward_cpu.py`` measures its peak per window), so the run's
peak is the one the real network would reach on top of the blending state. Each prompt count runs in a
process of its own, so each peak (VmHWM) is its own. ``--predict-module`` times another version of
the code, e.g. an older commit unpacked with ``git archive`` and put first on ``PYTHONPATH``
(``duplus.evaluate.inference`` before the inference package existed). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, nargs=3, default=[300, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--window", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--predict-module", default="duplus.inference.predict")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forward-mb", type=float, default=0.0,
                        help="memory each window's forward holds at its peak, logits included (0: none)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: one prompt count
    return parser.parse_args(argv)


def own_peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stand_in(prompts: int, forward_mb: float = 0.0):
    """The stand-in network: logits 20 x (image - level_k), one level per prompt; beside its logits it
    fills and frees ``forward_mb`` MB less theirs (the real network's activations at their peak)."""
    import torch
    from torch import nn

    class OrganStandIn(nn.Module):
        """One parameter, so that the device can be read from it."""

        def __init__(self) -> None:
            super().__init__()
            self.levels = nn.Parameter(torch.linspace(1.0, 2.0, prompts))

        def forward(self, image, modality, context, targets):
            logits = (image - self.levels.view(1, -1, 1, 1, 1)).mul_(20.0)
            extra = int(forward_mb * 2**20) - logits.nbytes
            if extra > 0:
                torch.ones(extra, dtype=torch.uint8)  # every page written, then freed
            return logits

    return OrganStandIn()


def organ_volume(size):
    """A smooth random field [Z, Y, X]: class k of the stand-in is where it exceeds the k-th level."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    z, y, x = size
    coarse = torch.randn(1, 1, z // 32 + 2, y // 32 + 2, x // 32 + 2)
    return nn.functional.interpolate(coarse, size=(z, y, x), mode="trilinear")[0, 0].contiguous()


def run_one(args: argparse.Namespace, prompts: int) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    predict = importlib.import_module(args.predict_module)
    volume = organ_volume(args.size)
    base = own_peak_rss_mb()
    config = {"pretrain": {"patch_size": list(args.window)},
              "inference": {"overlap": args.overlap, "sw_batch_size": args.sw_batch_size}}
    start = time.perf_counter()
    masks = predict.predict_masks(stand_in(prompts, args.forward_mb), volume, 0, torch.zeros(8), torch.zeros(prompts, 8), config,
                                  show_progress=False)
    return {"prompts": prompts, "peak_rss_mb": own_peak_rss_mb(), "before_blending_mb": base,
            "seconds": time.perf_counter() - start, "masks_mb": masks.nbytes / 2**20}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args, args.one)), flush=True)
        return {}
    runs = []
    for prompts in args.prompts:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--one", str(prompts)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                    else {"prompts": prompts, "failed": f"exit {done.returncode}"})
    result = {"script": "bench/blend_memory.py", "predict_module": args.predict_module, "volume": args.size,
              "window": args.window, "overlap": args.overlap, "sw_batch_size": args.sw_batch_size,
              "forward_mb": args.forward_mb, "runs": runs,
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()

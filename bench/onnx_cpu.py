"""DuPLUS's backbone exported to ONNX and run by ONNX Runtime on a CPU, beside torch eager, for one window.

Whether an exported backend is worth adding: the backbone pass (stems, encoder, decoder; FiLM from
the context prompt) is exported once for a fixed window and modality, then timed under ONNX Runtime
and under torch (``no_grad``), alternating, best of ``--rounds``. The dynamic head and controller
stay in torch for both (they take the prompts), so logits and masks compare like for like. Needs
``onnx``, ``onnxscript`` and ``onnxruntime``, which the project does not depend on: run it from a
venv of its own with the repository first on ``PYTHONPATH``. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from duplus.model import DuPLUS, ModelConfig


class Backbone(nn.Module):
    """``DuPLUS.features`` for CT windows: (decoder features, bottleneck).

    The CT stem is called directly: the stems route a batch by ``torch.unique`` of the modality
    indices, which ``torch.export`` cannot trace (a single-modality batch takes one stem anyway).
    """

    def __init__(self, net: DuPLUS) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        films = self.net.film_params(context)
        skips = self.net.encoder(self.net.stems["CT"](image), films)
        bottleneck = skips[-1]
        return self.net.decoder(skips, films), bottleneck


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, nargs=3, default=[128, 128, 128], metavar=("Z", "Y", "X"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    return args


def main(argv: list[str] | None = None) -> dict:
    import numpy as np
    import onnxruntime as ort

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = DuPLUS(ModelConfig.preset("paper", text_dim=512)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # FiLM switched on, as in bench/forward_cpu.py
        for film in net.film.values():
            film.out.weight.copy_(0.02 * torch.randn(film.out.weight.shape, generator=generator))
        for p in net.parameters():
            p.requires_grad_(False)
    image = torch.randn((1, 1, *args.window), generator=generator)
    context, targets = torch.randn((1, 512), generator=generator), torch.randn((args.prompts, 512), generator=generator)
    backbone = Backbone(net).eval()
    result: dict = {"script": "bench/onnx_cpu.py", "window": args.window, "prompts": args.prompts, "note": args.note,
                    "load_average_at_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "backbone.onnx"
        start = time.perf_counter()
        # The training path's out-of-place ops export (enable_grad; nothing requires grad, no graph).
        # The exporter prints its progress on stdout, where the JSON goes.
        with torch.enable_grad(), contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(backbone, (image, context), str(path), input_names=["image", "context"],
                              output_names=["features", "bottleneck"], opset_version=18, dynamo=True,
                              external_data=True)
        result["export_seconds"] = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {"image": image.numpy(), "context": context.numpy()}
        times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        outputs = {}
        for _ in range(args.rounds):
            start = time.perf_counter()
            with torch.no_grad():
                outputs["torch"] = backbone(image, context)
            times["torch"].append(time.perf_counter() - start)
            start = time.perf_counter()
            features, bottleneck = session.run(["features", "bottleneck"], feeds)
            times["onnxruntime"].append(time.perf_counter() - start)
            outputs["onnxruntime"] = torch.from_numpy(features), torch.from_numpy(bottleneck)
            print(f"torch {times['torch'][-1]:.1f} s, onnxruntime {times['onnxruntime'][-1]:.1f} s", file=sys.stderr)
    with torch.no_grad():
        logits = {name: net.head(f, net.controller(b, net.project_targets(targets[None]))) for name, (f, b) in outputs.items()}
    diff = (logits["onnxruntime"] - logits["torch"]).abs()
    masks_ort, masks_torch = logits["onnxruntime"] > 0, logits["torch"] > 0
    inter = (masks_ort & masks_torch).sum().item()
    dice = 2 * inter / max(1, masks_ort.sum().item() + masks_torch.sum().item())
    result.update({
        "seconds_backbone": {name: min(t) for name, t in times.items()}, "seconds_all_rounds": times,
        "speedup_onnxruntime_over_torch": min(times["torch"]) / min(times["onnxruntime"]),
        "max_abs_feature_diff": float((outputs["onnxruntime"][0] - outputs["torch"][0]).abs().max()),
        "max_abs_logit_diff": float(diff.max()), "mask_dice": dice, "masks_equal": bool(torch.equal(masks_ort, masks_torch)),
        "machine": {"threads": args.threads, "torch": torch.__version__, "onnxruntime": ort.__version__,
                    "numpy": np.__version__, "python": platform.python_version(),
                    "load_average_at_end": list(os.getloadavg()), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    })
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()

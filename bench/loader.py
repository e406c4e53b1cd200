"""Data-path throughput: patches/s of the training sampler alone vs training steps/s with it.

Builds a synthetic preprocessed store (blobs in noise) in a temporary folder and prints one JSON
object on stdout. If patches/s is well above batch x steps/s, the loader is not the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from duplus import __version__
from duplus.data.manifest import read_manifests
from duplus.model import DuPLUS, ModelConfig
from duplus.prompts.cache import PromptCache
from duplus.runtime import configure_kernels, resolve_device
from duplus.train.batches import TextTable, batch_loss
from duplus.train.optim import build_optimizer, resolve_amp
from duplus.train.sampling import PatchSampler, make_loader

PRESETS = {
    "tiny": {"volume": [48, 64, 64], "cases": 6, "patch": [32, 32, 32], "batch": 2, "workers": 0},
    "paper": {"volume": [160, 256, 256], "cases": 4, "patch": [128, 128, 128], "batch": 2, "workers": 4},
}
LABELS = {"1": "liver", "2": "liver tumor", "3": "spleen", "4": "right kidney"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--workers", type=int, default=None, help="loader worker processes")
    parser.add_argument("--batches", type=int, default=None, help="batches timed (default 20 tiny, 16 paper)")
    parser.add_argument("--warmup-batches", type=int, default=4,
                        help="batches drawn before timing starts (worker start-up, first page faults)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--text-dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-train", action="store_true",
                        help="time the loader only (a paper-size step on CPU takes minutes)")
    parser.add_argument("--compare", type=Path, nargs="+", default=None,
                        help="bench/train_step.py JSON files (e.g. from a GPU machine): compare the loader with "
                             "their fastest samples/s; missing files are skipped")
    return parser.parse_args(argv)


def build_store(root: Path, shape: list[int], cases: int) -> Path:
    """A one-dataset store in the preprocessed format; returns its manifest."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    rows = []
    for number in range(cases):
        case = f"bench_{number:03d}"
        folder = root / case
        folder.mkdir(parents=True)
        label = np.zeros(shape, dtype=np.uint8)
        for label_id in range(1, len(LABELS) + 1):
            centre = np.array([rng.integers(s // 4, 3 * s // 4) for s in shape]).reshape(3, 1, 1, 1)
            radius = min(shape) // (6 if label_id != 2 else 12)
            label[((grid - centre) ** 2).sum(0) <= radius**2] = label_id
        image = (rng.normal(size=shape).astype(np.float32) * 0.3 + label).astype(np.float32)
        np.save(folder / "image.npy", image)
        np.save(folder / "label.npy", label)
        locations = {}
        for label_id in range(1, len(LABELS) + 1):
            points = np.argwhere(label == label_id).astype(np.int32)
            locations[str(label_id)] = points[rng.permutation(len(points))[:4096]]
        np.savez(folder / "locations.npz", **locations)
        (folder / "meta.json").write_text("{}")
        rows.append({"dataset": "bench_ct", "case": case, "center": "a", "modality": "CT", "sequence": "",
                     "region": "abdomen", "split": "train", "image": f"{case}/image.npy", "label": f"{case}/label.npy",
                     "meta": f"{case}/meta.json", "locations": f"{case}/locations.npz", "shape": "x".join(map(str, shape)),
                     "labels": json.dumps(LABELS), "raw_image": "", "raw_label": ""})
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": os.cpu_count(), "torch": torch.__version__, "duplus": __version__,
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }


def seconds_per_sample(sampler: PatchSampler, count: int = 8) -> float:
    """Cost of one patch (read, crop, masks, augmentation) in this process, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    try:
        sampler.sample(0, 0, 0)
        started = time.perf_counter()
        for step in range(1, count + 1):
            sampler.sample(0, step, 0)
        return (time.perf_counter() - started) / count
    finally:
        torch.set_num_threads(threads)


def time_loader(sampler: PatchSampler, batch: int, batches: int, warmup: int, workers: int, pin: bool) -> tuple[float, float]:
    """(steady-state patches/s, seconds until the first batch) of the loader alone.

    Timing starts once ``warmup`` (at least 1, and at least one per worker) batches have arrived, so
    worker start-up is left out.
    """
    # Every worker delivers a batch before the clock starts (workers start one after another), and
    # each delivers several more while it runs: start-up skew stays out of the rate.
    warmup = max(1, warmup, workers)
    started = time.perf_counter()
    first = timed_from = 0.0
    loader = make_loader(sampler, 0, batch, 1, 0, warmup + batches, num_workers=workers, pin_memory=pin)
    for number, _ in enumerate(loader, start=1):
        if number == 1:
            first = time.perf_counter() - started
        if number == warmup:
            timed_from = time.perf_counter()
    return batches * batch / (time.perf_counter() - timed_from), first


def time_training(sampler: PatchSampler, texts: list[str], args: argparse.Namespace, preset: dict, device: torch.device,
                  batches: int, workers: int) -> dict:
    """Training steps/s fed by the loader, and the share of step time spent waiting for a batch."""
    amp = resolve_amp("auto", device)
    generator = torch.Generator().manual_seed(0)
    cache = PromptCache({t: torch.randn(args.text_dim, generator=generator) for t in texts}, "bench-random", args.text_dim)
    table = TextTable(cache, texts, device)
    model = DuPLUS(ModelConfig.preset(args.preset, text_dim=args.text_dim)).to(device).train()
    optimizer = build_optimizer(model.parameters(), 1e-4, 3e-5, device)
    loader = make_loader(sampler, 1, preset["batch"], 1, 0, batches + 2, num_workers=workers, pin_memory=device.type == "cuda")
    waited, started = 0.0, time.perf_counter()
    for number, (batch, wait) in enumerate(_timed(loader)):
        if number == 2:  # the first steps warm up kernels and workers
            _sync(device)
            started, waited = time.perf_counter(), 0.0
        waited += wait
        loss = batch_loss(model, batch, table, amp)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - started
    return {"train_steps_per_s": batches / seconds, "train_patches_per_s": batches * preset["batch"] / seconds,
            "share_of_step_waiting_for_data": waited / seconds, "amp": str(amp).replace("torch.", "") if amp else "fp32"}


def fastest_step(paths: list[Path]) -> dict | None:
    """The fastest timed run over bench/train_step.py results (files that do not exist are skipped)."""
    found = []
    for path in paths:
        if not path.is_file():
            print(f"{path}: not found, skipped", file=sys.stderr)
            continue
        measured = json.loads(path.read_text())
        for run in measured.get("runs", []):
            if "samples_per_s" in run:
                found.append({"file": str(path), "variant": run["variant"], "samples_per_s": run["samples_per_s"],
                              "batch": run.get("batch", measured.get("batch")),
                              "device": measured.get("machine", {}).get("device")})
    if not found:  # the loader's own numbers still stand (the suite's train_step may have failed)
        print(f"no timed training step in {[str(p) for p in paths]}: nothing to compare with", file=sys.stderr)
        return None
    return max(found, key=lambda run: run["samples_per_s"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    workers = preset["workers"] if args.workers is None else args.workers
    batches = args.batches or (20 if args.preset == "tiny" else 16)
    device = resolve_device(args.device)
    configure_kernels(device)  # as the pipeline runs (deterministic: false)
    with tempfile.TemporaryDirectory() as tmp:
        print("building synthetic store ...", file=sys.stderr)
        manifest = build_store(Path(tmp), preset["volume"], preset["cases"])
        sampler = PatchSampler(read_manifests([manifest]), preset["patch"])
        per_sample = seconds_per_sample(sampler)
        print("timing the loader ...", file=sys.stderr)
        loader_batches = max(batches, 4 * workers)  # several batches from every worker, not start-up skew
        loader_rate, first_batch = time_loader(sampler, preset["batch"], loader_batches, args.warmup_batches, workers,
                                               device.type == "cuda")
        training = None
        if not args.no_train:
            print("timing training steps ...", file=sys.stderr)
            training = time_training(sampler, sampler.all_texts(), args, preset, device, batches, workers)
    result = {
        "script": "bench/loader.py",
        "preset": args.preset,
        "patch": preset["patch"],
        "volume": preset["volume"],
        "batch": preset["batch"],
        "workers": workers,
        "sample_seconds_one_thread": per_sample,
        "loader_patches_per_s": loader_rate,
        "loader_first_batch_seconds": first_batch,
        "timed_batches": loader_batches,
    }
    if training:
        result.update(training)
        result["loader_to_train_ratio"] = loader_rate / training["train_patches_per_s"]
    step = fastest_step(args.compare) if args.compare else None
    if step is not None:
        result["compared_with"] = step
        result["loader_to_compared_ratio"] = loader_rate / step["samples_per_s"]
        # Workers needed to stay 2x ahead of that step rate, at this run's measured rate per worker.
        per_worker = loader_rate / max(workers, 1)
        result["workers_for_2x_compared"] = math.ceil(2 * step["samples_per_s"] / per_worker)
    result["machine"] = _machine(device)
    print(json.dumps(result, indent=2))
    return result


def _timed(loader):
    """Yield (batch, seconds spent waiting for it)."""
    iterator = iter(loader)
    while True:
        started = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, time.perf_counter() - started


if __name__ == "__main__":
    main()

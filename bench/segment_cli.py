"""`duplus segment` as a user meets it: how fast a mistaken command is answered, and many scans in one call
against one call per scan.

- ``errors``: wall time of `duplus segment` with a missing input file (exit 2, before torch is imported),
  as a ratio to `python -c pass` (the interpreter's own start-up), median of ``--repeats`` runs each;
- ``batch``: ``--scans`` small synthetic CTs (``--size`` voxels at ``--spacing`` mm; the demo config's
  6 mm preprocessing and 32^3 window, the tiny model, 2 classes) segmented by one `duplus segment -i FOLDER`
  call and by one call per scan; seconds per scan of each, and their ratio.

Every command runs as its own process, as a user would run it. Prints one JSON object to stdout:

    .venv/bin/python bench/segment_cli.py > bench/results/segment_cli-cpu2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = "liver, liver tumor"
IDENTITY = "bench-encoder@0"
TEXT_DIM = 8


def log(message: str) -> None:
    print(f"[bench/segment_cli] {message}", file=sys.stderr, flush=True)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DUPLUS_NO_PROGRESS="1", HF_HUB_OFFLINE="1", PYTHONUTF8="1")
    return env


def _timed(command: list[str], cwd: Path, expect: int) -> float:
    started = time.perf_counter()
    child = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if child.returncode != expect:
        raise SystemExit(f"{' '.join(command)} exited {child.returncode}, expected {expect}:\n{child.stderr[-2000:]}")
    return seconds


def errors(repeats: int, work: Path) -> dict:
    baseline = [_timed([sys.executable, "-c", "pass"], work, 0) for _ in range(repeats)]
    mistaken = [sys.executable, "-m", "duplus.cli", "segment", "-i", str(work / "missing.nii.gz"), "-o", str(work / "o"),
                "--prompts", "liver", "--modality", "CT"]
    failing = [_timed(mistaken, work, 2) for _ in range(repeats)]
    return {"python_pass_s": round(statistics.median(baseline), 3), "missing_input_s": round(statistics.median(failing), 3),
            "ratio": round(statistics.median(failing) / statistics.median(baseline), 2), "repeats": repeats}


def _setup(work: Path, scans: int, size: list[int], spacing: float) -> dict:
    """Scans, a tiny model and a prompt cache holding exactly the texts the runs need."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from duplus.model import DuPLUS, ModelConfig, save_model
    from duplus.prompts.cache import build_prompt_cache
    from duplus.prompts.catalog import resolve_free_text
    from duplus.prompts.templates import context_prompt

    class Encoder:
        identity, dim = IDENTITY, TEXT_DIM

        def encode(self, texts, batch_size=64):
            return torch.stack([torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(len(t))) for t in texts])

    folder = work / "scans"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(scans):
        array = rng.normal(40.0, 20.0, size[::-1]).astype(np.int16)
        array[:, :, : size[0] // 8] = -1000  # air beside the body, as a CT has
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((spacing,) * 3)
        sitk.WriteImage(image, str(folder / f"case{k:02d}.nii.gz"))
    torch.manual_seed(0)
    weights = work / "model.safetensors"
    save_model(DuPLUS(ModelConfig.preset("tiny", text_dim=TEXT_DIM)), weights,
               {"text_encoder": IDENTITY, "patch_size": [32, 32, 32], "preprocess": {"spacing": [6.0, 6.0, 6.0]}})
    texts = [context_prompt("CT", "abdomen")] + [item[2] for item in resolve_free_text(PROMPTS, "CT")]
    build_prompt_cache(texts, Encoder(), work / "prompts.safetensors")
    return {"folder": folder, "weights": weights, "cache": work / "prompts.safetensors"}


def batch(scans: int, size: list[int], spacing: float, work: Path) -> dict:
    made = _setup(work, scans, size, spacing)
    common = ["--prompts", PROMPTS, "--modality", "CT", "--weights", str(made["weights"]), "--prompt-cache",
              str(made["cache"]), "--device", "cpu", "-q"]
    command = [sys.executable, "-m", "duplus.cli", "segment"]
    log(f"one call for {scans} scans")
    together = _timed([*command, "-i", str(made["folder"]), "-o", str(work / "batch"), *common], work, 0)
    log("again: every scan done, all skipped")
    rerun = _timed([*command, "-i", str(made["folder"]), "-o", str(work / "batch"), *common], work, 0)
    summary = json.loads((work / "batch" / "summary.json").read_text(encoding="utf-8"))
    assert summary["counts"]["skipped"] == scans, summary["counts"]
    log(f"one call per scan, {scans} calls")
    single = [_timed([*command, "-i", str(scan), "-o", str(work / "single" / scan.name), *common], work, 0)
              for scan in sorted(made["folder"].iterdir())]
    per_single = sum(single) / scans
    return {"scans": scans, "size": size, "spacing_mm": spacing, "batch_total_s": round(together, 2),
            "batch_per_scan_s": round(together / scans, 3), "single_call_per_scan_s": round(per_single, 3),
            "speedup_per_scan": round(per_single / (together / scans), 2), "rerun_all_skipped_s": round(rerun, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["errors", "batch"], choices=["errors", "batch"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scans", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, default=3.0)
    args = parser.parse_args(argv)
    result: dict = {"script": "segment_cli", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()}}
    with tempfile.TemporaryDirectory(prefix="duplus-bench-") as folder:
        work = Path(folder)
        if "errors" in args.parts:
            result["errors"] = errors(args.repeats, work)
        if "batch" in args.parts:
            result["batch"] = batch(args.scans, args.size, args.spacing, work)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

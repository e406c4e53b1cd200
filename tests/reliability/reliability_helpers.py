"""Helpers of the reliability suite: the tiny config, the fork-server client, output validators.

Kept out of conftest.py so that test modules can import them by name.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "schemas" / "config.schema.yaml"
TINY_YAML = ROOT / "tests" / "integration" / "config_tiny.yaml"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SERVER = Path(__file__).with_name("stage_server.py")
DATASETS = ("demo_abdomen_ct", "demo_abdomen_mri", "demo_headneck_pet")

# Smaller still than the integration test's config: every stage finishes in seconds on one core.
SMALLER: dict[str, Any] = {
    "device": "cpu",
    "demo": {"cases_per_center": 2, "headneck_patients": 10},
    # 8 mm voxels: volumes of about 20x28x38, so inference and feature extraction take a moment.
    "preprocess": {"spacing": [8.0, 8.0, 8.0]},
    # Non-overlapping windows: a handful of forward passes per volume.
    "inference": {"overlap": 0.0, "sw_batch_size": 4},
    # One wording per class: 36 prompts instead of 148, the encoding cost of the cache stage shrinks.
    "prompts": {"paraphrases": False, "batch_size": 64},
    "pretrain": {"steps": 8, "batch_size": 1, "patch_size": [16, 16, 16], "checkpoint_every": 2,
                 "log_every": 2, "warmup_steps": 2, "num_workers": 0},
    # A checkpoint after every step: a kill mid-training resumes from one.
    "lora": {"steps": 2, "batch_size": 1, "rank": 2, "alpha": 4, "checkpoint_every": 1},
    "evaluate": {"max_cases_per_dataset": 1},
    # The text merge loads a second copy of the text encoder; the tabular merge exercises the same
    # writers and readers at a fraction of the cost.
    "prognosis": {"folds": 2, "epochs": 3, "hidden": 8, "merge": ["tabular"]},
}


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` merged into a copy of ``base`` the way Snakemake merges a --configfile."""
    merged = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validated(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` validated against the schema, with the schema's defaults filled in (as Snakemake does)."""
    from snakemake.utils import validate

    validate(config, str(SCHEMA))
    return config


def tiny_config(root: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """config.yaml + tests/integration/config_tiny.yaml + ``SMALLER`` (+ ``overrides``), validated.

    With ``root``, ``paths`` point inside it (absolute), so a stage run from any working folder reads
    the same inputs and an output written elsewhere still names the same originals.
    """
    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    config = deep_merge(config, yaml.safe_load(TINY_YAML.read_text(encoding="utf-8")))
    config = deep_merge(config, SMALLER)
    config = deep_merge(config, overrides)
    if root is not None:
        config["paths"] = {"raw": str(root / "data" / "raw"), "preprocessed": str(root / "data" / "preprocessed"),
                           "results": str(root / "results")}
    return validated(config)


def importable(module: str) -> bool:
    """Whether ``module`` exists and imports (packages still in progress may lack it)."""
    try:
        return importlib.util.find_spec(module) is not None and bool(__import__(module))
    except Exception:  # noqa: BLE001 - a half-finished module may fail in any way on import
        return False


def child_env() -> dict[str, str]:
    """Environment of every subprocess: one thread (bitwise reproducible, and the cores are shared)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", DUPLUS_NO_PROGRESS="1", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")


class StageServer:
    """Client of ``stage_server.py``: runs library stage calls in forked children, optionally killing them."""

    def __init__(self, start_timeout: float = 240.0) -> None:
        self.process = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(),
                                        cwd=ROOT)
        reply = self._read(start_timeout)
        if not reply.get("ready"):
            raise RuntimeError(f"stage server did not start: {reply}")

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"stage server gave no answer within {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"stage server exited (code {self.process.poll()})")
        return json.loads(line)

    def run(self, call: str, workdir: Path, kill_after: float | None = None, timeout: float = 240.0,
            fault: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Run ``call`` (``module:function``) with ``kwargs`` in a forked child working in ``workdir``.

        Returns the server's reply: ``status`` is ok, error (a DuplusError), crashed, killed or timeout.
        """
        assert self.process.stdin is not None
        request = {"call": call, "workdir": str(workdir), "kwargs": _jsonable(kwargs), "kill_after": kill_after,
                   "timeout": timeout, "fault": fault}
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()
        return self._read(timeout + 60)

    def run_ok(self, call: str, workdir: Path, **kwargs: Any) -> dict[str, Any]:
        """``run`` that must finish cleanly; the stage's own log is shown otherwise."""
        reply = self.run(call, workdir, **kwargs)
        if reply["status"] != "ok":
            log = (workdir / "stage.log").read_text(encoding="utf-8")[-4000:] if (workdir / "stage.log").is_file() else ""
            raise AssertionError(f"{call} ended with {reply['status']}: {reply['message'][-4000:]}\n{log}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # the server leaves its read loop and exits
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# --- outputs -------------------------------------------------------------------------------------

def is_temporary(path: Path) -> bool:
    """Names only a writer uses while writing (``.name.XXXX.tmp...`` of ``duplus.atomic``, staging folders)."""
    return any(part.startswith(".") for part in path.parts)


def final_files(root: Path) -> list[Path]:
    """Files under ``root`` a reader may open: not hidden, not inside a hidden (staging) folder."""
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and not is_temporary(p.relative_to(root)))


def check_readable(path: Path) -> None:
    """Open ``path`` with the reader of its format; AssertionError if it is truncated or corrupt."""
    name = path.name
    try:
        if name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif name.endswith(".npy"):
            np.load(path, mmap_mode="r", allow_pickle=False)
            np.asarray(np.load(path, allow_pickle=False)).sum()
        elif name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as bundle:
                for key in bundle.files:
                    bundle[key]
        elif name.endswith(".safetensors"):
            from safetensors.numpy import load_file

            load_file(str(path))
        elif name.endswith(".csv"):
            import pandas as pd

            pd.read_csv(path)
            # A CSV cut between lines still parses; one cut inside a line lacks the final newline.
            text = path.read_bytes()
            assert text.endswith(b"\n"), "does not end with a newline (cut mid-line)"
        elif name.endswith((".nii.gz", ".nii")):
            from duplus.data.image_io import read_image

            read_image(path)
    except AssertionError as error:
        raise AssertionError(f"{path}: truncated or corrupt output ({error})") from None
    except Exception as error:  # noqa: BLE001 - any reader failure means a broken file under a final name
        raise AssertionError(f"{path}: truncated or corrupt output ({type(error).__name__}: {error})") from None


def check_tree_readable(root: Path) -> list[Path]:
    """``check_readable`` on every final file under ``root``; returns the files checked."""
    files = final_files(root)
    for path in files:
        check_readable(path)
    return files


def relative_set(root: Path, ignore: Iterable[str] = ()) -> set[str]:
    ignored = tuple(ignore)
    return {str(p.relative_to(root)) for p in final_files(root) if not p.name.endswith(ignored)}


def assert_same_bytes(a: Path, b: Path) -> None:
    assert a.read_bytes() == b.read_bytes(), f"{b} differs from the uninterrupted run's {a}"


def assert_same_npz(a: Path, b: Path) -> None:
    """Equal arrays (the zip container stores a timestamp, so its bytes may differ)."""
    with np.load(a) as left, np.load(b) as right:
        assert sorted(left.files) == sorted(right.files), f"{b}: other arrays than {a}"
        for key in left.files:
            assert left[key].dtype == right[key].dtype and np.array_equal(left[key], right[key]), f"{b}[{key}]"


def assert_same_json(a: Path, b: Path, ignore: Iterable[str] = ()) -> None:
    left, right = json.loads(a.read_text(encoding="utf-8")), json.loads(b.read_text(encoding="utf-8"))
    for key in ignore:
        left.pop(key, None)
        right.pop(key, None)
    assert left == right, f"{b} differs from the uninterrupted run's {a}"


def assert_same_safetensors(a: Path, b: Path) -> None:
    """Same tensor names, dtypes and bits (file bytes too, when the writer is deterministic)."""
    from safetensors.numpy import load_file

    left, right = load_file(str(a)), load_file(str(b))
    assert sorted(left) == sorted(right), f"{b}: other tensors than {a}"
    for key in left:
        assert left[key].dtype == right[key].dtype and left[key].tobytes() == right[key].tobytes(), f"{b}[{key}]"


# --- stages --------------------------------------------------------------------------------------

# Every stage of the reference run, in pipeline order; lora only once its module exists.
STAGE_CALLS = {
    "download": "duplus.data.download:run_download",
    "preprocess": "duplus.data.preprocess:run_preprocess",
    "cache_prompts": "duplus.prompts.cache:run_cache_prompts",
    "pretrain": "duplus.train.pretrain:run_pretrain",
    "evaluate": "duplus.evaluate.evaluate_stage:run_evaluate",
    "lora": "duplus.train.lora:run_lora",
    "prognosis": "duplus.prognosis.prognosis_stage:run_prognosis",
}
LORA_CENTER = "ct_siteB"


def stage_kwargs(stage: str, ref: Path, out: Path, config: dict[str, Any],
                 dataset: str = DATASETS[0]) -> dict[str, Any]:
    """Arguments of ``stage`` reading inputs from the reference run ``ref`` and writing under ``out``."""
    manifests = [str(ref / "data" / "preprocessed" / d / "manifest.csv") for d in DATASETS]
    cache = str(ref / "results" / "prompts" / "minilm.safetensors")
    model = str(ref / "results" / "pretrain" / "model.safetensors")
    if stage == "download":
        return {"dataset": dataset, "config": config,
                "out_record": str(out / "data" / "raw" / dataset / "download.json")}
    if stage == "preprocess":
        return {"dataset": dataset, "config": config,
                "download_record": str(ref / "data" / "raw" / dataset / "download.json"),
                "out_manifest": str(out / "data" / "preprocessed" / dataset / "manifest.csv"), "threads": 1}
    if stage == "cache_prompts":
        return {"config": config, "out_cache": str(out / "results" / "prompts" / "minilm.safetensors")}
    if stage == "pretrain":
        return {"config": config, "manifests": manifests, "prompt_cache": cache,
                "out_model": str(out / "results" / "pretrain" / "model.safetensors"),
                "out_log": str(out / "results" / "pretrain" / "train_log.csv")}
    if stage == "evaluate":
        return {"config": config, "manifests": manifests, "prompt_cache": cache, "model_path": model,
                "out_dir": str(out / "results" / "evaluate" / "universal")}
    if stage == "lora":
        return {"config": config, "center": LORA_CENTER, "manifests": manifests, "prompt_cache": cache,
                "model_path": model, "out_dir": str(out / "results" / "lora" / LORA_CENTER)}
    if stage == "prognosis":
        return {"config": config, "manifest": str(ref / "data" / "preprocessed" / "demo_headneck_pet" / "manifest.csv"),
                "prompt_cache": cache, "model_path": model, "out_dir": str(out / "results" / "prognosis")}
    raise KeyError(stage)


class ReferenceRun:
    """An uninterrupted run of every stage on the tiny config, in ``root``; ``seconds[stage]`` its durations."""

    def __init__(self, root: Path, config: dict[str, Any], server: StageServer) -> None:
        self.root, self.config, self.server = root, config, server
        self.seconds: dict[str, float] = {}
        self.failed: dict[str, str] = {}

    def build(self) -> None:
        for dataset in DATASETS:
            self._run("download", dataset)
            self._run("preprocess", dataset)
        self._run("cache_prompts")
        self._run("pretrain")
        self._run("evaluate", required=False)
        if importable("duplus.train.lora"):
            self._run("lora", required=False)
        self._run("prognosis", required=False)

    def _run(self, stage: str, dataset: str = DATASETS[0], required: bool = True) -> None:
        kwargs = stage_kwargs(stage, self.root, self.root, self.config, dataset)
        reply = self.server.run(STAGE_CALLS[stage], self.root, **kwargs)
        if reply["status"] != "ok":
            log = (self.root / "stage.log").read_text(encoding="utf-8")[-3000:] if (self.root / "stage.log").is_file() else ""
            message = f"{reply['status']}: {reply['message'][-3000:]}\n{log}"
            if required:
                raise AssertionError(f"reference run of {stage} failed: {message}")
            self.failed[stage] = message  # a downstream stage still in progress; its test reports it
            return
        key = stage if stage not in ("preprocess", "download") else f"{stage}:{dataset}"
        self.seconds[key] = reply["seconds"]

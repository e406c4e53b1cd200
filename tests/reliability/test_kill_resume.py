"""Kills: every stage SIGKILLed at a random instant, then rerun, ends with the outputs of an uninterrupted run.

Expectation "killed-stage-resumes": after a SIGKILL at any point,
  1. every file under a final (non-hidden) name is complete: it opens with its format's reader, and
     the library's own loaders either return a valid object or raise a ``DuplusError``;
  2. rerunning the stage with the same inputs finishes, and
  3. its outputs equal those of an uninterrupted run: bitwise for arrays, tensors and tables of the
     deterministic CPU stages; wall-clock fields (``seconds``, ``created``, ...) are left out.

Each stage runs in a child forked from ``stage_server.py`` (so only the stage's own work is timed),
with one intra-op thread, reading the reference run's inputs and writing into its own folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from reliability_helpers import (
    DATASETS,
    LORA_CENTER,
    STAGE_CALLS,
    ReferenceRun,
    StageServer,
    assert_same_bytes,
    assert_same_json,
    assert_same_npz,
    assert_same_safetensors,
    check_tree_readable,
    final_files,
    relative_set,
    stage_kwargs,
)

# Fields that hold wall-clock time or memory (they differ between any two runs), and the phases a
# rerun took over from the killed attempt.
TIMING_KEYS = ("created", "seconds", "seconds_lora", "seconds_full", "peak_rss_mb", "peak_rss_mb_lora",
               "peak_rss_mb_full", "resumed_phases")


# --- what "identical" means per stage ----------------------------------------------------------

def compare_preprocess(ref: Path, new: Path) -> None:
    dataset = DATASETS[0]
    a, b = ref / "data" / "preprocessed" / dataset, new / "data" / "preprocessed" / dataset
    assert relative_set(a) == relative_set(b), "the rerun left other files than an uninterrupted run"
    for left in final_files(a):
        right = b / left.relative_to(a)
        if left.suffix == ".npz":
            assert_same_npz(left, right)
        else:
            # Raw paths inside manifest.csv and meta.json name the shared raw folder, so these are
            # byte-identical too.
            assert_same_bytes(left, right)


def compare_cache(ref: Path, new: Path) -> None:
    a, b = ref / "results" / "prompts", new / "results" / "prompts"
    assert_same_bytes(a / "minilm.safetensors", b / "minilm.safetensors")
    assert_same_json(a / "minilm.json", b / "minilm.json", ignore=("created",))


def compare_pretrain(ref: Path, new: Path) -> None:
    a, b = ref / "results" / "pretrain", new / "results" / "pretrain"
    # The docstring of run_pretrain promises bit-identical weights after a resume on CPU.
    assert_same_bytes(a / "model.safetensors", b / "model.safetensors")
    assert_same_json(a / "model.json", b / "model.json")
    left, right = pd.read_csv(a / "train_log.csv"), pd.read_csv(b / "train_log.csv")
    pd.testing.assert_frame_equal(left[["step", "loss", "lr"]], right[["step", "loss", "lr"]], check_exact=True)


def compare_evaluate(ref: Path, new: Path) -> None:
    a, b = ref / "results" / "evaluate" / "universal", new / "results" / "evaluate" / "universal"
    assert relative_set(a) == relative_set(b), "the rerun left other files than an uninterrupted run"
    for name in ("per_case.csv", "summary.csv"):
        assert_same_bytes(a / name, b / name)
    for left in (a / "examples").glob("*.npz"):
        assert_same_npz(left, b / "examples" / left.name)
    assert_same_json(a / "efficiency.json", b / "efficiency.json",
                     ignore=("seconds_per_volume", "peak_rss_mb", "class_scaling_ratio", "cases_resumed"))


def compare_lora(ref: Path, new: Path) -> None:
    a, b = ref / "results" / "lora" / LORA_CENTER, new / "results" / "lora" / LORA_CENTER
    assert relative_set(a) == relative_set(b)
    for left in final_files(a):
        right = b / left.relative_to(a)
        if left.suffix == ".safetensors":
            assert_same_safetensors(left, right)
        elif left.suffix == ".json":
            assert_same_json(left, right, ignore=TIMING_KEYS)
        else:
            assert_same_bytes(left, right)


def compare_prognosis(ref: Path, new: Path) -> None:
    a, b = ref / "results" / "prognosis", new / "results" / "prognosis"
    for name in ("folds.csv", "risks.csv", "summary.csv", "km.json", "cohort.json"):
        assert_same_bytes(a / name, b / name)


COMPARE: dict[str, Callable[[Path, Path], None]] = {
    "preprocess": compare_preprocess, "cache_prompts": compare_cache, "pretrain": compare_pretrain,
    "evaluate": compare_evaluate, "lora": compare_lora, "prognosis": compare_prognosis,
}
OUTPUT_DIRS = {
    "preprocess": "data/preprocessed", "cache_prompts": "results/prompts", "pretrain": "results/pretrain",
    "evaluate": "results/evaluate/universal", "lora": f"results/lora/{LORA_CENTER}",
    "prognosis": "results/prognosis",
}


# --- what a reader sees right after the kill ---------------------------------------------------

def check_library_readers(stage: str, out: Path) -> None:
    """The library's loaders on whatever a killed run left: a valid object or a clean DuplusError."""
    from duplus.errors import DuplusError

    if stage == "cache_prompts":
        from duplus.prompts.cache import PromptCache

        path = out / "results" / "prompts" / "minilm.safetensors"
        try:
            cache = PromptCache.load(path)
            assert len(cache) > 0
        except DuplusError:
            pass
    if stage == "pretrain":
        from duplus.model.model_files import load_model
        from duplus.train.checkpoint import load_latest_checkpoint

        folder = out / "results" / "pretrain"
        load_latest_checkpoint(folder / "checkpoints")  # skips incomplete ones, never raises
        if (folder / "model.safetensors").exists():
            try:
                load_model(folder / "model.safetensors")
            except DuplusError:
                pass
    if stage == "lora":
        from duplus.model.adapters import read_adapter

        adapter = out / "results" / "lora" / LORA_CENTER / "adapter"
        if adapter.exists():
            try:
                read_adapter(adapter)
            except DuplusError:
                pass
    if stage == "preprocess":
        manifest = out / "data" / "preprocessed" / DATASETS[0] / "manifest.csv"
        if manifest.exists():
            frame = pd.read_csv(manifest)
            for column in ("image", "label", "meta", "locations"):
                for relative in frame[column]:
                    assert (manifest.parent / relative).is_file(), f"{manifest} names a missing {relative}"


def check_train_log_prefix(ref: Path, out: Path) -> None:
    """A killed pretraining's log holds a prefix of the uninterrupted run's rows, never a cut row."""
    log = out / "results" / "pretrain" / "train_log.csv"
    if log.exists():
        got = pd.read_csv(log)[["step", "loss", "lr"]]
        want = pd.read_csv(ref / "results" / "pretrain" / "train_log.csv")[["step", "loss", "lr"]].head(len(got))
        pd.testing.assert_frame_equal(got, want, check_exact=True)


STAGES = ["preprocess", "cache_prompts", "pretrain", "evaluate",
          "lora",
          "prognosis"]


@pytest.mark.parametrize("stage", STAGES)
def test_killed_stage_resumes_to_identical_outputs(stage: str, reference: ReferenceRun, stage_server: StageServer,
                                                   kill_rng: random.Random, tmp_path: Path) -> None:
    if stage in reference.failed:
        pytest.fail(f"the uninterrupted run of {stage} fails, so its resume cannot be checked: "
                    f"{reference.failed[stage][:2000]}")
    ref_seconds = reference.seconds[stage if stage != "preprocess" else f"preprocess:{DATASETS[0]}"]
    delay = kill_rng.uniform(0.05, 0.95) * ref_seconds
    seed = kill_rng.seed_value  # type: ignore[attr-defined]
    context = f"(kill after {delay:.2f} s of {ref_seconds:.2f} s; DUPLUS_KILL_SEED={seed})"
    kwargs = stage_kwargs(stage, reference.root, tmp_path, reference.config)

    killed = stage_server.run(STAGE_CALLS[stage], tmp_path, kill_after=delay, **kwargs)
    assert killed["status"] in ("killed", "ok"), f"{stage} {killed} {context}"

    output = tmp_path / OUTPUT_DIRS[stage]
    try:
        check_tree_readable(output)
        check_library_readers(stage, tmp_path)
        if stage == "pretrain":
            check_train_log_prefix(reference.root, tmp_path)
    except AssertionError as error:
        raise AssertionError(f"{error} {context}") from None

    stage_server.run_ok(STAGE_CALLS[stage], tmp_path, **kwargs)
    try:
        COMPARE[stage](reference.root, tmp_path)
    except AssertionError as error:
        raise AssertionError(f"{error} {context}") from None


@pytest.mark.parametrize("file_name", ["step_00000004.json", "model.json"])
def test_pretrain_killed_while_writing(file_name: str, reference: ReferenceRun, stage_server: StageServer,
                                       tmp_path: Path) -> None:
    """The two instants a time-based kill rarely hits: half-way through a checkpoint's record (the
    run must resume from the previous checkpoint), and between the final weights and their sidecar
    (the weights must not load without their sidecar). Both end bit-identical after a rerun."""
    from duplus.errors import DuplusError
    from duplus.model.model_files import load_model

    kwargs = stage_kwargs("pretrain", reference.root, tmp_path, reference.config)
    reply = stage_server.run(STAGE_CALLS["pretrain"], tmp_path, fault={"name": file_name, "atomic": True}, **kwargs)
    assert reply["status"] == "killed", reply
    folder = tmp_path / "results" / "pretrain"
    check_tree_readable(folder)
    check_train_log_prefix(reference.root, tmp_path)
    if file_name == "model.json":
        with pytest.raises(DuplusError, match="sidecar"):
            load_model(folder / "model.safetensors")
    else:
        assert not (folder / "checkpoints" / file_name).exists()
    stage_server.run_ok(STAGE_CALLS["pretrain"], tmp_path, **kwargs)
    compare_pretrain(reference.root, tmp_path)


def test_evaluation_killed_inside_a_case_record_redoes_only_that_case(reference: ReferenceRun,
                                                                      stage_server: StageServer,
                                                                      tmp_path: Path) -> None:
    """Evaluation's 4th write is the second case's journal record (after the first case's example
    and record, and the second's example): killed half-way through it, the rerun takes the first
    case from the journal, evaluates the others, and ends with the uninterrupted run's outputs."""
    if "evaluate" in reference.failed:
        pytest.fail(f"the uninterrupted evaluation fails: {reference.failed['evaluate'][:2000]}")
    kwargs = stage_kwargs("evaluate", reference.root, tmp_path, reference.config)
    reply = stage_server.run(STAGE_CALLS["evaluate"], tmp_path, fault={"write": 4, "atomic": True}, **kwargs)
    assert reply["status"] == "killed", reply
    out = tmp_path / OUTPUT_DIRS["evaluate"]
    check_tree_readable(out)
    assert not (out / "per_case.csv").exists()
    stage_server.run_ok(STAGE_CALLS["evaluate"], tmp_path, **kwargs)
    compare_evaluate(reference.root, tmp_path)
    assert json.loads((out / "efficiency.json").read_text(encoding="utf-8"))["cases_resumed"] == 1


def test_rerun_after_kill_reads_no_stale_state(reference: ReferenceRun, stage_server: StageServer,
                                               tmp_path: Path) -> None:
    """Expectation "stale-leftovers-ignored": a kill during the final install step of preprocessing
    (staging and trash folders left behind) does not leak into the next run's store."""
    kwargs = stage_kwargs("preprocess", reference.root, tmp_path, reference.config)
    out = tmp_path / "data" / "preprocessed" / DATASETS[0]
    (out / ".staging-leftover" / "case").mkdir(parents=True)
    (out / ".staging-leftover" / "case" / "image.npy").write_bytes(b"\x93NUMPY half")
    (out / ".trash-leftover").mkdir()
    stage_server.run_ok(STAGE_CALLS["preprocess"], tmp_path, **kwargs)
    assert not list(out.glob(".staging-*")) and not list(out.glob(".trash-*"))
    compare_preprocess(reference.root, tmp_path)


@pytest.mark.parametrize("atomic_writes", [True, False], ids=["atomic", "non-atomic"])
def test_stage_killed_mid_write(atomic_writes: bool, reference: ReferenceRun, stage_server: StageServer,
                                tmp_path: Path) -> None:
    """Expectation "atomicity-is-load-bearing" on a real stage: preprocessing killed half-way through
    writing its manifest leaves nothing truncated under a final name with atomic writes, while with
    a plain writer the check used after every kill above reports the truncated manifest."""
    kwargs = stage_kwargs("preprocess", reference.root, tmp_path, reference.config, dataset=DATASETS[1])
    fault = {"name": "manifest.csv", "atomic": atomic_writes}
    reply = stage_server.run(STAGE_CALLS["preprocess"], tmp_path, fault=fault, **kwargs)
    assert reply["status"] == "killed", reply
    store = tmp_path / "data" / "preprocessed" / DATASETS[1]
    if atomic_writes:
        check_tree_readable(store)
        assert not (store / "manifest.csv").exists()
    else:
        with pytest.raises(AssertionError, match="manifest.csv"):
            check_tree_readable(store)

"""Data-parallel pretraining: two gloo ranks on CPU reproduce one process holding the whole batch."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from duplus.errors import ConfigError
from duplus.prompts.cache import build_prompt_cache
from duplus.train import distributed
from duplus.train.cases import pretraining_cases
from duplus.train.sampling import PatchSampler, RankIndices


def test_ranks_together_draw_exactly_the_single_process_samples():
    single = list(RankIndices(3, 6, batch_size=4, grad_accum=2, rank=0, world=1))
    ranks = [list(RankIndices(3, 6, batch_size=4, grad_accum=2, rank=r, world=2)) for r in range(2)]
    assert single == list(range(3 * 8, 6 * 8))
    assert sorted(ranks[0] + ranks[1]) == single
    # Micro-batch by micro-batch: rank 0 takes the first half of each global micro-batch.
    assert ranks[0][:2] == [24, 25] and ranks[1][:2] == [26, 27]
    assert len(ranks[0]) == len(ranks[0]) == 12


def test_global_batch_must_split_over_the_ranks():
    with pytest.raises(ConfigError, match="batch_size 3"):
        distributed.per_rank_batch(3, distributed.Ranks(rank=0, world=2))
    assert distributed.per_rank_batch(4, distributed.Ranks(rank=1, world=2)) == 2


class _FixedEncoder:
    """A deterministic stand-in text encoder, so the cache can be written to a file for the ranks."""

    identity = "test-encoder"
    dim = 12

    def encode(self, texts, batch_size=64):
        from .conftest import FakePromptCache

        return FakePromptCache(dim=self.dim).get_many(list(texts))


@pytest.fixture(scope="module")
def prompt_file(store, tmp_path_factory) -> Path:
    from .conftest import BASE_CONFIG

    sampler = PatchSampler(pretraining_cases(BASE_CONFIG, list(store.values())), BASE_CONFIG["pretrain"]["patch_size"])
    path = tmp_path_factory.mktemp("prompts") / "fixed.safetensors"
    build_prompt_cache(sampler.all_texts(), _FixedEncoder(), path)
    return path


def _train(store, prompt_file: Path, folder: Path, processes: int) -> None:
    from .conftest import BASE_CONFIG

    config = copy.deepcopy(BASE_CONFIG)
    config["pretrain"].update(steps=4, batch_size=2, log_every=1, checkpoint_every=2, warmup_steps=1)
    kwargs = {"config": config, "manifests": [str(m) for m in store.values()], "prompt_cache": str(prompt_file),
              "out_model": str(folder / "model.safetensors"), "out_log": str(folder / "train_log.csv")}
    distributed.launch("pretrain", processes, kwargs)


def test_two_gloo_ranks_match_one_process_with_the_whole_batch(store, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _train(store, prompt_file, tmp_path / "single", processes=1)
    _train(store, prompt_file, tmp_path / "ddp", processes=2)
    single = pd.read_csv(tmp_path / "single" / "train_log.csv")
    ddp = pd.read_csv(tmp_path / "ddp" / "train_log.csv")
    assert ddp["step"].tolist() == single["step"].tolist() == [1, 2, 3, 4]
    assert ddp["loss"].to_numpy() == pytest.approx(single["loss"].to_numpy(), rel=1e-3)
    a = load_file(tmp_path / "single" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "model.safetensors")
    assert a.keys() == b.keys()
    # Adam moves a weight by up to ~lr per step whatever its gradient's size, so weights with a
    # near-zero gradient may differ by float noise times that; the bulk must agree closely.
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    print("weight difference: max", diff.max().item(), "mean", diff.mean().item())
    assert diff.mean().item() < 1e-5 and diff.max().item() < 4 * 0.002 * 4
    # Only rank 0 wrote: one set of checkpoints, no stray temporary files.
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir() if p.suffix == ".json") == [
        "step_00000002.json", "step_00000004.json"]


def test_a_data_parallel_run_resumes_as_the_uninterrupted_one(store, prompt_file, tmp_path, monkeypatch):
    """Every rank restores the checkpoint rank 0 wrote (weights, optimizer, EMA, running loss) into
    its wrapped network and goes on exactly as the uninterrupted run."""
    import shutil

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _train(store, prompt_file, tmp_path / "straight", processes=2)
    shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    for path in (tmp_path / "resumed" / "checkpoints").glob("step_00000004.*"):
        path.unlink()  # as if killed after the checkpoint of step 2
    _train(store, prompt_file, tmp_path / "resumed", processes=2)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight = pd.read_csv(tmp_path / "straight" / "train_log.csv")
    resumed = pd.read_csv(tmp_path / "resumed" / "train_log.csv")
    assert resumed["step"].tolist() == [1, 2, 3, 4] and resumed["loss"].tolist() == straight["loss"].tolist()


def test_failed_rank_is_a_clear_error(store, tmp_path, monkeypatch):
    from duplus.errors import DuplusError

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with pytest.raises(DuplusError, match="torchrun exit code"):
        _train(store, tmp_path / "missing.safetensors", tmp_path / "ddp", processes=2)
    assert not (tmp_path / "ddp" / "model.safetensors").exists()


def _vote(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ranks = distributed.Ranks(rank=rank, world=2, local_rank=rank)
    distributed.start(ranks, torch.device("cpu"))
    votes = [distributed.any_rank(rank == 1, ranks), distributed.any_rank(False, ranks)]
    Path(out_dir, f"rank{rank}.txt").write_text(" ".join(map(str, votes)))
    distributed.stop(ranks)


def test_a_stop_requested_on_one_rank_is_agreed_by_all(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_vote, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["True False", "True False"]


def test_sigterm_to_the_launcher_reaches_the_ranks_which_checkpoint_and_stop(store, prompt_file, tmp_path,
                                                                             monkeypatch):
    """scancel or a preemption notice sent to the job's first process: torchrun and the ranks get
    it, rank 0 checkpoints, and the launcher reports a resumable stop, not a failure."""
    import os
    import signal
    import threading
    import time

    from duplus.errors import TrainingInterrupted

    from .conftest import BASE_CONFIG

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = copy.deepcopy(BASE_CONFIG)
    config["pretrain"].update(steps=400, batch_size=2, log_every=1, checkpoint_every=1000, warmup_steps=1)
    folder = tmp_path / "ddp"
    kwargs = {"config": config, "manifests": [str(m) for m in store.values()], "prompt_cache": str(prompt_file),
              "out_model": str(folder / "model.safetensors"), "out_log": str(folder / "train_log.csv")}

    def preempt() -> None:
        deadline = time.monotonic() + 240
        while not (folder / "train_log.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the launcher's stop flag

    thread = threading.Thread(target=preempt)
    thread.start()
    try:
        with pytest.raises(TrainingInterrupted, match="rerun to resume"):
            distributed.launch("pretrain", 2, kwargs)
    finally:
        thread.join()
    steps = sorted(p.name for p in (folder / "checkpoints").iterdir() if p.suffix == ".json")
    assert len(steps) == 1 and steps[0] != "step_00000400.json"
    assert not (folder / "model.safetensors").exists()

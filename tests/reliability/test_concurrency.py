"""Concurrency: one pipeline run per working folder; readers of caches and checkpoints during a write.

Expectation "one-run-per-folder": while a Snakemake run holds a working folder, a second run on the
same folder is refused by Snakemake's lock, and the first run is not disturbed.

Expectation "reader-during-write": a reader loading the prompt cache, training checkpoints or a
model file while a writer rewrites them gets a complete, self-consistent object or a clean
"not there yet / being written" ``DuplusError``; never a mix of two versions, never another error.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from reliability_helpers import ROOT, SNAKEMAKE, child_env

# --- Snakemake's lock ------------------------------------------------------------------------------


def _snakemake(workdir: Path, overrides: Path, *args: str) -> list[str]:
    return [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--configfile",
            str(ROOT / "config.yaml"), str(overrides), "--cores", "1", *args]


def test_second_snakemake_run_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    overrides = tmp_path / "slow.yaml"
    # A demo big enough that generating it outlasts the second run's start-up; the first run is
    # stopped as soon as the second has been refused, so its size costs nothing more.
    overrides.write_text("demo:\n  cases_per_center: 200\n")
    target = "data/raw/demo_abdomen_ct/download.json"
    first = subprocess.Popen(_snakemake(workdir, overrides, target), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    try:
        locks = workdir / ".snakemake" / "locks"
        deadline = time.monotonic() + 180
        while not (locks.is_dir() and any(locks.iterdir())):
            assert first.poll() is None, "the first run ended before taking its lock"
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.1)
        second = subprocess.run(_snakemake(workdir, overrides, target), capture_output=True, text=True, encoding="utf-8",
                                errors="replace", env=child_env(), timeout=300)
        assert first.poll() is None, "the first run had finished: the overlap was not tested"
        output = second.stdout + second.stderr
        assert second.returncode != 0, output[-2000:]
        assert "cannot be locked" in output, output[-2000:]
        assert "rule download" not in output, "the refused run scheduled a job"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGTERM)  # the session started above: snakemake and its job
        first.communicate(timeout=120)


# --- prompt cache -------------------------------------------------------------------------------------

class GenerationEncoder:
    """Embeds text t as a vector derived from (t, identity); the identity changes every generation."""

    dim = 8

    def __init__(self, generation: int) -> None:
        self.identity = f"encoder-generation-{generation}"

    @staticmethod
    def vector(text: str, identity: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(f"{identity}|{text}".encode()).digest()[:4], "little")
        return torch.randn(8, generator=torch.Generator().manual_seed(seed))

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        return torch.stack([self.vector(t, self.identity) for t in texts])


def texts_of(generation: int) -> list[str]:
    return [f"prompt {i}" for i in range(20)] + [f"generation {generation} extra {i}" for i in range(generation % 5)]


def run_concurrently(writer: Callable[[], None], reader: Callable[[], None], seconds: float,
                     enough: Callable[[], bool] = lambda: True) -> None:
    """Run ``reader`` in a loop on a thread while ``writer`` runs for ``seconds`` (longer, up to 20 s
    more, until ``enough()`` on a loaded machine); re-raise the reader's first error."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                reader()
            except BaseException as error:  # noqa: BLE001 - reported to the test below
                errors.append(error)
                return

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        started = time.monotonic()
        while not errors:
            elapsed = time.monotonic() - started
            if elapsed >= seconds + 20 or (elapsed >= seconds and enough()):
                break
            writer()
    finally:
        stop.set()
        thread.join(timeout=60)
    if errors:
        raise errors[0]


def test_prompt_cache_reader_sees_whole_generations_only(tmp_path: Path) -> None:
    from duplus.errors import PromptError
    from duplus.prompts.cache import PromptCache, build_prompt_cache, ensure_prompts

    path = tmp_path / "prompts" / "enc.safetensors"
    generation = [0]
    seen = {"complete": 0, "refused": 0}

    def writer() -> None:
        generation[0] += 1
        encoder = GenerationEncoder(generation[0])
        build_prompt_cache(texts_of(generation[0]), encoder, path)
        ensure_prompts(path, [f"free text {generation[0]}"], encoder)

    def reader() -> None:
        try:
            cache = PromptCache.load(path)
        except PromptError:
            seen["refused"] += 1  # not written yet, or tensors and manifest from two writes
            return
        # Every vector belongs to the identity the cache reports: no mix of two generations.
        for text in cache.texts:
            assert torch.equal(cache.get(text), GenerationEncoder.vector(text, cache.encoder_identity)), text
        seen["complete"] += 1

    run_concurrently(writer, reader, seconds=2.0, enough=lambda: generation[0] > 3 and seen["complete"] > 0)
    assert generation[0] > 3 and seen["complete"] > 0, (generation, seen)


# --- training checkpoints ---------------------------------------------------------------------------

def test_checkpoint_reader_sees_complete_checkpoints_only(tmp_path: Path) -> None:
    from duplus.train.checkpoint import load_latest_checkpoint, save_checkpoint

    step = [0]
    seen = {"complete": 0, "none": 0}

    def writer() -> None:
        step[0] += 1
        save_checkpoint(tmp_path, step[0], {"w": torch.full((2000,), float(step[0])), "step": step[0],
                                            "log": [{"step": s} for s in range(step[0])]}, keep=2)

    def reader() -> None:
        latest = load_latest_checkpoint(tmp_path)  # documented never to raise on a partial checkpoint
        if latest is None:
            seen["none"] += 1
            return
        number, state = latest
        assert state["step"] == number and torch.equal(state["w"], torch.full((2000,), float(number)))
        assert len(state["log"]) == number
        seen["complete"] += 1

    run_concurrently(writer, reader, seconds=2.0, enough=lambda: step[0] > 3 and seen["complete"] > 0)
    assert step[0] > 3 and seen["complete"] > 0, (step, seen)


# --- model files ------------------------------------------------------------------------------------

def _tiny_model(fill: float) -> Any:
    from duplus.model import DuPLUS, ModelConfig

    model = DuPLUS(ModelConfig(channels=(4, 8), blocks_per_stage=1, text_dim=8, embed_dim=8, head_channels=4))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(fill)
    return model


def test_model_replaced_while_being_loaded_is_never_mixed_with_its_sidecar(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer replaces the weights right after the loader read them (the worst instant, made
    deterministic here): the loader must not return the new weights with the old sidecar, nor
    weights it did not verify."""
    import duplus.model.model_files as model_io
    from duplus.errors import DuplusError

    path = tmp_path / "model.safetensors"
    model_io.save_model(_tiny_model(1.0), path, meta={"fill": 1.0})
    replacement = tmp_path / "other" / "model.safetensors"
    model_io.save_model(_tiny_model(2.0), replacement, meta={"fill": 2.0})
    real_read = Path.read_bytes
    swapped = [False]

    def read_then_swap(self: Path) -> bytes:
        data = real_read(self)
        if not swapped[0] and self == path:
            swapped[0] = True
            os.replace(replacement, path)  # the concurrent writer's rename lands now
        return data

    monkeypatch.setattr(Path, "read_bytes", read_then_swap)
    try:
        model, sidecar = model_io.load_model(path)
    except DuplusError:
        assert swapped[0]
        return  # refusing is fine: the file changed under the reader
    assert swapped[0], "the loader never read the weights file, so the race was not exercised"
    value = next(model.parameters()).flatten()[0].item()
    assert value == sidecar["fill"], "weights of one write were returned with the sidecar of another"


def test_model_reader_during_rewrites(tmp_path: Path) -> None:
    """The same as a free-running race: a reader thread while a writer alternates two models."""
    from duplus.errors import DuplusError
    from duplus.model.model_files import load_model, save_model

    path = tmp_path / "model.safetensors"
    models = {1.0: _tiny_model(1.0), 2.0: _tiny_model(2.0)}
    save_model(models[1.0], path, meta={"fill": 1.0})
    turn = [0]
    seen = {"complete": 0, "refused": 0}

    def writer() -> None:
        turn[0] += 1
        fill = 1.0 if turn[0] % 2 else 2.0
        save_model(models[fill], path, meta={"fill": fill})

    def reader() -> None:
        try:
            model, sidecar = load_model(path)
        except DuplusError:
            seen["refused"] += 1  # weights and sidecar of two different writes: a clean refusal
            return
        assert next(model.parameters()).flatten()[0].item() == sidecar["fill"]
        seen["complete"] += 1

    run_concurrently(writer, reader, seconds=1.5, enough=lambda: turn[0] > 3 and seen["complete"] > 0)
    assert turn[0] > 3 and seen["complete"] > 0, (turn, seen)

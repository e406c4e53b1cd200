"""Resumable training checkpoints: what a loop saves (``TrainState``), and how (safetensors + JSON with their sha256).

A checkpoint whose JSON is missing or unreadable, or whose tensors do not match the hash, is never read.

The record keeping is ``duplus.journal``'s: ``step_<step>.json`` is a journal record, written after
the tensors it vouches for (``step_<step>.safetensors``, by sha256), and a checkpoint is complete when
the journal verifies it. What stays here is what a journal does not do: turning a training state
into tensors and JSON without pickle, choosing the newest complete step, pruning the older ones,
and the ``TrainState`` a loop declares its parts in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from duplus.errors import CheckpointError
from duplus.journal import Journal, journal_key
from duplus.tensorfile import tensor_bytes

log = logging.getLogger(__name__)

FORMAT = "duplus-train-checkpoint/2"
# The key of every checkpoint record: what makes a record a training checkpoint of this layout. Whose
# run it continues is the caller's check (the run's identity saved in the state, or a folder that is a
# journal workspace under the run's key), not the record's.
_KEY = journal_key({"format": FORMAT})
_LEGACY = "duplus-train-checkpoint/1"  # the record format before checkpoints were journal records
_NAME = re.compile(r"^step_(\d{8,})\.json$")


def _split(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor of a nested structure by a reference; keep the rest JSON-able."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # A clone: safetensors refuses tensors that share storage (views of one buffer).
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj and "__items__" not in obj:
            return {k: _split(v, tensors) for k, v in obj.items()}
        # Optimizer state is keyed by int parameter ids; keep the key types.
        return {"__items__": [[k, _split(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_split(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint (tensors and JSON values only)")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``_split``."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {_key(k): _join(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def _key(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def checkpoint_paths(folder: str | os.PathLike, step: int) -> tuple[Path, Path]:
    """(tensors file, JSON file) of the checkpoint of ``step``."""
    stem = Path(folder) / f"step_{int(step):08d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def list_checkpoints(folder: str | os.PathLike) -> list[int]:
    """Steps with a checkpoint JSON in ``folder``, newest first (not yet verified)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return sorted(steps, reverse=True)


def save_checkpoint(folder: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` atomically, then delete all but the newest ``keep`` complete ones.

    Args:
        folder: checkpoint folder (created).
        step: optimizer steps done; names the checkpoint.
        state: nested dicts/lists/tuples of tensors and JSON values (state_dicts, RNG states, ...).
        keep: complete checkpoints kept (the newest and, by default, the one before it).
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors)
    payload = tensor_bytes(tensors, metadata={"format": FORMAT, "step": str(int(step))})
    tensor_path, json_path = checkpoint_paths(folder, step)
    # The journal writes the tensors, then the record: its presence with a matching hash is what
    # makes a checkpoint complete.
    Journal(folder).save(json_path.stem, _KEY, {"step": int(step), "state": skeleton}, write={tensor_path.name: payload})
    _prune(Path(folder), keep)
    return json_path


def _prune(folder: Path, keep: int) -> None:
    complete = 0
    for step in list_checkpoints(folder):
        tensor_path, json_path = checkpoint_paths(folder, step)
        if complete >= keep:
            for path in (json_path, tensor_path):
                path.unlink(missing_ok=True)
            continue
        try:
            _read(folder, step)
            complete += 1
        except CheckpointError:
            continue  # a broken newer one does not count, and is left for inspection
    # Leftovers of writes that were killed: temporary files, and tensors whose record never came.
    for path in folder.glob(".step_*.tmp*"):
        path.unlink(missing_ok=True)
    listed = set(list_checkpoints(folder))
    for path in folder.glob("step_*.safetensors"):
        if path.stem[5:].isdigit() and int(path.stem[5:]) not in listed:
            path.unlink(missing_ok=True)


def _read(folder: Path, step: int) -> dict[str, Any]:
    tensor_path, json_path = checkpoint_paths(folder, step)
    # The journal hands back the very bytes it hashed: the file cannot change between the check and the load.
    found = Journal(folder).lookup(json_path.stem, _KEY, read=[tensor_path.name])
    if found.data is None:
        legacy = _read_legacy(tensor_path, json_path, step)
        if legacy is None:
            raise CheckpointError(f"{json_path}: not a complete checkpoint of step {step} ({found.reason})")
        skeleton, payload = legacy
    elif found.data.get("step") != step or "state" not in found.data:
        raise CheckpointError(f"{json_path}: not a {FORMAT} record of step {step}")
    else:
        skeleton, payload = found.data["state"], found.contents[tensor_path.name]
    try:
        tensors = load_safetensors_bytes(payload)
        return _join(skeleton, tensors)
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{tensor_path}: not a safetensors checkpoint of this project ({error})") from error


def _read_legacy(tensor_path: Path, json_path: Path, step: int) -> tuple[Any, bytes] | None:
    """(state skeleton, tensor bytes) of a checkpoint written before checkpoints were journal records,
    or None when ``json_path`` is not one: a long run killed before an upgrade resumes after it.

    Raises:
        CheckpointError: when it is one, but its tensors are missing or not the ones it records.
    """
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _LEGACY or record.get("step") != step \
            or "state" not in record:
        return None
    try:
        payload = tensor_path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{tensor_path}: missing checkpoint tensors ({error})") from error
    if hashlib.sha256(payload).hexdigest() != record.get("sha256"):
        raise CheckpointError(f"{tensor_path}: sha256 differs from the one recorded in {json_path.name} (truncated or replaced)")
    return record["state"], payload


def load_checkpoint(folder: str | os.PathLike, step: int) -> dict[str, Any]:
    """The verified state of one checkpoint; ``CheckpointError`` if it is incomplete or altered."""
    return _read(Path(folder), int(step))


def load_latest_checkpoint(folder: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
    """(step, state) of the newest complete checkpoint in ``folder``, or None when there is none.

    Incomplete or altered checkpoints are skipped with a warning, never read.
    """
    for step in list_checkpoints(folder):
        try:
            return step, _read(Path(folder), step)
        except CheckpointError as error:
            log.warning("skipping checkpoint of step %d: %s", step, error)
    return None


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random generators a training step draws from (dropout), for a checkpoint."""
    # The generator of the training device only: a run checkpointed where two GPUs were visible
    # resumes where one is. Ranks are seeded alike and draw alike, so rank 0's state is every rank's.
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's; the first trained
            cuda = cuda[0] if len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


class Stateful(Protocol):
    """What a checkpoint part offers: torch's ``state_dict`` / ``load_state_dict`` pair."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass(frozen=True)
class Value:
    """A plain value of a training loop (a counter, the log rows) as a checkpoint part.

    ``get`` reads it when a checkpoint is written; ``put`` takes the saved value back on resume
    (the default ignores it: a value saved to be compared, such as the run's identity).
    """

    get: Callable[[], Any]
    put: Callable[[Any], None] = lambda saved: None

    def state_dict(self) -> Any:
        return self.get()

    def load_state_dict(self, state: Any) -> None:
        self.put(state)


class RandomState:
    """The random generators a training step draws from (dropout), as a checkpoint part."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.device)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_rng_state(state, self.device)


class TrainState:
    """What a training checkpoint holds: named parts, each saved and restored under its one name.

    A loop declares its parts once; ``state_dict`` saves every part and ``load_state_dict`` restores
    every part, in the declared order, so nothing can be saved and then forgotten on resume (or
    restored without having been saved). The names are the checkpoint's top-level keys.
    """

    def __init__(self, parts: Mapping[str, Stateful]) -> None:
        self.parts = dict(parts)

    def state_dict(self) -> dict[str, Any]:
        """Every part's state, by name (references to the live tensors: save it before the next step)."""
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: Mapping[str, Any], where: str | os.PathLike) -> None:
        """Restore every part from ``state`` (a checkpoint of ``where``, named in errors).

        Raises:
            CheckpointError: when the checkpoint lacks parts this loop saves (written by another loop).
        """
        missing = [name for name in self.parts if name not in state]
        if missing:
            raise CheckpointError(f"{where}: the checkpoint lacks {missing} (it holds {sorted(state)}); "
                                  "it was written by another kind of training: delete the folder to start over")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])

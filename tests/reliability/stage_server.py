"""Fork server of the reliability tests: imports the stage modules once, runs each stage in a forked child.

Importing torch, monai and transformers takes 10-30 s per process on a shared 2-core machine; a child
forked from a process that imported them (and never computed with them, so no thread pool exists yet)
starts in milliseconds. The child is an ordinary process running the real stage function, so a
SIGKILL at a random instant is exactly what a preempted or OOM-killed job experiences.

The server is also the child's parent, so it kills and reaps the child itself: a pid is never
signalled after it was reaped (and possibly reused).

Protocol, one JSON object per line on stdin/stdout:
    request  {"call": "module:function", "workdir": str, "kwargs": {...}, "kill_after": float | null,
              "timeout": float, "fault": {"write": k | "name": file name, "atomic": bool} | null}
    reply    {"pid": int, "status": "ok" | "error" | "crashed" | "killed" | "timeout",
              "seconds": float, "message": str}
``error`` is a ``DuplusError`` (message in ``message``), ``crashed`` any other exception or exit.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

# Modules whose import dominates a stage's start-up; failures (a package still missing) are
# reported by the stage call itself, not here.
PRELOAD = (
    "numpy", "pandas", "SimpleITK", "torch", "safetensors.torch", "transformers",
    "transformers.models.bert.modeling_bert", "duplus.data.download", "duplus.data.preprocess",
    "duplus.prompts.cache", "duplus.prompts.encoder", "duplus.model", "duplus.train.pretrain",
    "duplus.train.lora", "duplus.prognosis.prognosis_stage", "sksurv.linear_model", "sksurv.ensemble",
)

EXIT_OK, EXIT_DUPLUS_ERROR, EXIT_CRASH = 0, 3, 4


def _preload() -> None:
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def _install_fault(fault: dict[str, Any]) -> None:
    """Die with SIGKILL after half of the bytes of one atomic write reached the disk.

    The write is the ``write``-th one of the run, or the first whose final file is called ``name``.

    ``atomic: true`` keeps the temporary-name-then-rename protocol, so the half-written file is the
    hidden temporary one (a crash between write and rename); ``atomic: false`` writes straight to the
    final name, which is what a writer without ``duplus.atomic`` would do.
    """
    import duplus.atomic as atomic

    original = atomic.atomic_path
    target_write = int(fault.get("write", 0))
    target_name = fault.get("name")
    keep_atomic = bool(fault.get("atomic", True))
    count = [0]

    @contextlib.contextmanager
    def faulty(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
        count[0] += 1
        if count[0] != target_write and Path(path).name != target_name:
            with original(path, suffix) as tmp:
                yield tmp
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if keep_atomic:
            tmp = target.parent / f".{target.name}.fault.tmp{suffix or ''.join(target.suffixes)}"
        else:
            tmp = target
        yield tmp
        if tmp.is_file():
            size = tmp.stat().st_size
            os.truncate(tmp, size // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    # Modules that did ``from duplus.atomic import atomic_path`` hold their own reference.
    for module in list(sys.modules.values()):
        if getattr(module, "atomic_path", None) is original:
            module.atomic_path = faulty  # type: ignore[attr-defined]


def _child(request: dict[str, Any]) -> None:
    """Runs in the forked child; never returns."""
    code = EXIT_CRASH
    try:
        workdir = Path(request["workdir"])
        workdir.mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
        log = os.open(workdir / "stage.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        import torch

        torch.set_num_threads(1)  # the same thread count in every run keeps CPU results bitwise equal
        if request.get("fault"):
            _install_fault(request["fault"])
        module_name, function_name = request["call"].split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        from duplus.errors import DuplusError

        try:
            function(**request.get("kwargs", {}))
            code = EXIT_OK
        except DuplusError as error:
            (workdir / "stage.error").write_text(f"{type(error).__name__}: {error}")
            code = EXIT_DUPLUS_ERROR
    except BaseException:  # noqa: BLE001 - everything else is a crash, reported with its traceback
        with contextlib.suppress(Exception):
            Path("stage.error").write_text(traceback.format_exc())
        code = EXIT_CRASH
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)  # no atexit handlers or buffers of the parent run twice


def _run(request: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(request)
    kill_after = request.get("kill_after")
    timeout = float(request.get("timeout", 300))
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        elapsed = time.monotonic() - started
        if done:
            status = raw
            break
        limit = kill_after if kill_after is not None else timeout
        if elapsed >= limit:
            os.kill(pid, signal.SIGKILL)  # our own child, not yet reaped: the pid cannot have been reused
            _, status = os.waitpid(pid, 0)
            outcome = "killed" if kill_after is not None else "timeout"
            return {"pid": pid, "status": outcome, "seconds": elapsed, "message": ""}
        time.sleep(0.002)
    seconds = time.monotonic() - started
    message = ""
    error_file = Path(request["workdir"]) / "stage.error"
    if error_file.is_file():
        message = error_file.read_text(encoding="utf-8")
        error_file.unlink()
    if os.WIFSIGNALED(status):
        outcome = "killed" if os.WTERMSIG(status) == signal.SIGKILL else "crashed"
    else:
        outcome = {EXIT_OK: "ok", EXIT_DUPLUS_ERROR: "error"}.get(os.WEXITSTATUS(status), "crashed")
    return {"pid": pid, "status": outcome, "seconds": seconds, "message": message}


def main() -> None:
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        reply = _run(json.loads(line))
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()

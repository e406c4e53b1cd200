"""Run-time helpers shared by every stage: logging to the rule's log, device choice, seeding, memory."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import random
import re
import resource
import sys
import threading
from typing import Any, Iterator, Mapping

import numpy as np

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_path: str | None = None, level: int = logging.INFO) -> None:
    """Send duplus logs (and warnings) to stderr and, if given, to ``log_path``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="a", encoding="utf-8"))
    logging.basicConfig(level=level, format=LOG_FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)


@contextlib.contextmanager
def held_log_records(name: str) -> Iterator[list[logging.LogRecord]]:
    """Hold back what logger ``name`` (a library's) logs in this thread inside the block: the records go to
    the caller, not to any handler, so that a library's message becomes one line of ours, or none.

    A filter on the logger itself, so neither the library's own handler nor the root logger's print them;
    records of other threads (a scan read ahead while another is written) pass as usual.
    """
    logger = logging.getLogger(name)
    thread = threading.get_ident()
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.thread != thread:
            return True
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


# The devices a run may ask for. torch.device() takes many more ("meta", "xpu"), which either fail
# deep inside inference or silently produce no data, and refuses "gpu" with a bare RuntimeError; so
# "gpu"/"gpu:N" (TotalSegmentator's spelling) are read as cuda/cuda:N here, and the rest refused.
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, gpu, gpu:N (= cuda), mps"
_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|gpu)(:\d+)?)$")


def device_name(name: str) -> str:
    """The canonical spelling of a device name (``GPU:1`` -> ``cuda:1``), checked without importing torch.

    Raises ``ConfigError`` for a name outside ``DEVICE_CHOICES``.
    """
    from duplus.errors import ConfigError

    key = str(name).strip().lower()
    if not _DEVICE.match(key):
        raise ConfigError(f"device '{name}': expected one of {DEVICE_CHOICES} (case does not matter)")
    return "cuda" + key[3:] if key.startswith("gpu") else key


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821
    """``auto`` picks CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:1``/``gpu:1``/``mps`` (any case)
    are taken as given.

    Raises ``ConfigError`` for any other name, and for a device torch cannot see.
    """
    import torch

    from duplus.errors import ConfigError

    key = device_name(name)
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device '{name}' was asked for but torch sees no Apple GPU (MPS); use --device cpu")
    if key.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but torch sees no CUDA GPU; use --device cpu")
    device = torch.device(key)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' was asked for but torch sees {torch.cuda.device_count()} CUDA GPU(s) "
                          f"(valid cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def configure_kernels(device: "torch.device", deterministic: bool = False) -> None:  # noqa: F821
    """GPU kernel choice: fastest (cuDNN measures its algorithms per shape, TF32 for fp32 maths) or
    deterministic (fixed algorithms; slower, and the same numbers run after run). No-op on CPU.

    Training patches and inference windows have fixed shapes, so cuDNN's search runs once per
    shape; nnU-Net trains the same way. bf16 autocast is unaffected by the TF32 switches.
    """
    import torch

    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; ops without a deterministic CUDA
        # kernel (the trilinear upsampling's backward) warn instead of failing the run.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def device_for(config: Mapping[str, Any]) -> "torch.device":  # noqa: F821
    """The run's device (``config["device"]``) with its kernels configured (``config["deterministic"]``)."""
    from duplus.settings import Settings

    settings = Settings.of(config)
    device = resolve_device(settings.device)
    configure_kernels(device, settings.deterministic)
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# glibc's malloc serves blocks below its mmap threshold from a heap it gives back to the system only
# from the top, and raises that threshold to the size of each large block freed (up to 32 MiB). Once
# torch has freed one, inference's many mid-sized short-lived tensors come from the heap too, between
# small long-lived ones (the blending's class blocks), and the space they free stays resident. A fixed
# threshold keeps blocks of 1 MiB and more on mmap, given back when freed: with 32 prompts on a
# 300 x 512 x 512 CT the blending path's peak fell from 3.7 to 2.5 GB (bench/blend_memory.py; 4 and
# 16 MiB kept 4.1 and 3.1 GB). Afterwards the threshold goes to 32 MiB, where glibc's own would be by
# then, so that training in the same process (LoRA after its zero-shot scores) reuses its heap as
# before rather than mapping fresh pages for every tensor. Written with ctypes: neither torch nor
# numpy sets malloc's options.
INFERENCE_MMAP_THRESHOLD = 2**20
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


@functools.lru_cache(maxsize=1)
def _glibc_mallopt() -> Any:
    """glibc's ``mallopt``, or None on another C library (looked up once: ``libc_ver`` reads the
    Python executable)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return None


def _set_mmap_threshold(size: int) -> bool:
    mallopt = _glibc_mallopt()
    if mallopt is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, size))


@contextlib.contextmanager
def freed_memory_returned() -> Iterator[bool]:
    """Within the block, freed blocks of ``INFERENCE_MMAP_THRESHOLD`` and more go back to the system
    (see there); yields whether that took effect: only with glibc, and not where the user set
    ``MALLOC_MMAP_THRESHOLD_`` (their value stays)."""
    fixed = _set_mmap_threshold(INFERENCE_MMAP_THRESHOLD)
    try:
        yield fixed
    finally:
        if fixed:
            _set_mmap_threshold(GLIBC_MMAP_THRESHOLD_MAX)


STATM = "/proc/self/statm"


class RssPeak:
    """The highest resident memory of this process while a block runs, in MiB (``.mb``).

    ``peak_rss_mb`` is a high-water mark of the whole process, so a phase that follows a bigger
    one cannot be measured with it. Here a thread reads the current RSS from ``/proc/self/statm``
    every ``interval`` seconds, which gives each phase its own peak (a spike shorter than the
    interval can be missed). Without ``/proc`` (macOS) it falls back to the high-water mark.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = float(interval)
        self.mb = 0.0
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _current_mb(self, handle: Any) -> float:
        handle.seek(0)
        return int(handle.read().split()[1]) * self._page / 2**20

    def _record(self, handle: Any) -> None:
        if not self._paused.is_set():
            self.mb = max(self.mb, self._current_mb(handle))

    def _sample(self, handle: Any) -> None:
        with handle:
            while True:
                self._record(handle)
                if self._stop.wait(self.interval):
                    break
            self._record(handle)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block out of the peak (bookkeeping such as writing a checkpoint).

        Memory the block allocates and keeps counts again from the next sample after it.
        """
        self._paused.set()
        try:
            yield
        finally:
            self._paused.clear()

    def __enter__(self) -> "RssPeak":
        try:
            handle = open(STATM, "rb", buffering=0)  # noqa: SIM115 - closed by the sampling thread
        except OSError:
            return self
        self.mb = self._current_mb(handle)
        self._thread = threading.Thread(target=self._sample, args=(handle,), name="rss-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.mb = peak_rss_mb()
            return
        self._stop.set()
        self._thread.join()


def set_threads(threads: int | None) -> None:
    """Limit intra-op threads (OpenMP, BLAS, torch) to what the scheduler gave the job."""
    if not threads or threads <= 0:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(int(threads))
    # torch reads OMP_NUM_THREADS when it starts; if it already started, tell it directly.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))

"""Device choice and GPU kernel settings."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from duplus.errors import ConfigError
from duplus.runtime import RssPeak, configure_kernels, device_for, peak_rss_mb, resolve_device

FLAGS = ("benchmark", "deterministic", "allow_tf32")


@pytest.fixture
def restore_flags():
    saved = {name: getattr(torch.backends.cudnn, name) for name in FLAGS}
    matmul = torch.backends.cuda.matmul.allow_tf32
    algorithms = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    for name, value in saved.items():
        setattr(torch.backends.cudnn, name, value)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])
    if workspace is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def test_fast_or_deterministic_kernels_on_a_gpu_device(restore_flags):
    gpu = torch.device("cuda")  # a device object needs no GPU; only the backend flags are set
    configure_kernels(gpu, deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.are_deterministic_algorithms_enabled()
    configure_kernels(gpu, deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"]


def test_cpu_runs_leave_the_gpu_flags_alone(restore_flags):
    torch.backends.cudnn.benchmark = False
    assert device_for({"device": "cpu", "deterministic": False}) == torch.device("cpu")
    assert torch.backends.cudnn.benchmark is False
    assert device_for({}).type in ("cpu", "cuda")  # defaults: auto, not deterministic


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_gpu_that_is_not_there_names_the_fix():
    with pytest.raises(ConfigError, match="--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="no CUDA"):
        device_for({"device": "cuda:1"})


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="per-phase peaks need /proc")
def test_each_phase_gets_its_own_peak_not_the_process_high_water_mark():
    with RssPeak() as big:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        time.sleep(0.05)
        del block
    with RssPeak() as small:
        time.sleep(0.05)
    assert big.mb - small.mb > 200, (big.mb, small.mb)
    assert peak_rss_mb() >= big.mb - 1  # the high-water mark still remembers the big phase
    assert small.mb > 10  # a real reading: the interpreter and torch are resident


@pytest.mark.parametrize("name", ["meta", "cuda:x", "cpu:0", "gpux", ""])
def test_a_device_name_outside_the_choices_is_refused_with_them(name):
    with pytest.raises(ConfigError, match=r"expected one of auto, cpu, cuda, cuda:N, gpu, gpu:N \(= cuda\), mps"):
        resolve_device(name)


def test_gpu_is_read_as_cuda_and_names_are_checked_without_torch():
    from duplus.runtime import device_name

    assert device_name(" GPU ") == "cuda" and device_name("gpu:1") == "cuda:1" and device_name("MPS") == "mps"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):  # an alias of cuda, not a refused name
            resolve_device("gpu:0")


def test_device_names_are_read_case_insensitively():
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(" Auto ").type in ("cpu", "cuda")


# Long-lived 16 KiB blocks between short-lived 1.5 MiB ones, as blending's class blocks sit between
# its per-window tensors; a 16 MiB block freed first raises glibc's mmap threshold above 1.5 MiB.
FRAGMENTING = """
import os, sys, torch
from duplus.runtime import freed_memory_returned
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
torch.ones(16 * 2**20, dtype=torch.uint8).sum()  # made and freed at once
kept, passing = [], []
with freed_memory_returned() if sys.argv[1] == "fixed" else open(os.devnull) as fixed:
    for _ in range(200):
        passing.append(torch.ones(3 * 2**19, dtype=torch.uint8))
        kept.append(torch.ones(2**14, dtype=torch.uint8))
    before = rss_mb()
    passing.clear()
    print(fixed is True, before - rss_mb())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="glibc's malloc on Linux only")
def test_freed_blocks_of_a_mib_and_more_go_back_to_the_system():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    released = {}
    for mode in ("default", "fixed"):
        out = subprocess.run([sys.executable, "-c", FRAGMENTING, mode], capture_output=True, text=True, env=env,
                             check=True).stdout.split()
        released[mode] = (out[0] == "True", float(out[1]))
    # 300 MiB freed: glibc's own threshold keeps nearly all of it resident, the fixed one gives it back.
    assert released["fixed"][0] and released["fixed"][1] > 250
    assert released["default"][1] < 100, released

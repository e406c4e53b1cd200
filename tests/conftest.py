"""Test-wide settings: no progress bars, no hub access, torch's thread count, no declared class kept.

``DUPLUS_TEST_THREADS`` (default 1: the test machine's cores are shared, and small 3-D convolutions
only contend with more) sets torch's intra-op threads for every test. Each thread count, like each
``ATEN_CPU_CAPABILITY``, makes torch pick other kernels and reduction orders, which is as close as one
machine gets to another CPU: `make test` runs the tests marked ``learning`` a second time under
another kernel set and two threads (Makefile), so that an outcome holding on one CPU only cannot land.
"""

import getpass
import os
import tempfile

import pytest

os.environ.setdefault("DUPLUS_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TORCH_THREADS = int(os.environ.get("DUPLUS_TEST_THREADS", "1"))

# torch.compile's on-disk cache (inductor's compiled kernels and precompiled headers) is not keyed
# by ATEN_CPU_CAPABILITY: a kernel compiled under avx2 and reused under `default` fails to build
# (a C++ error, "'at::vec' has not been declared"). One cache folder per kernel set keeps them apart.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"torchinductor-{getpass.getuser()}-{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"),
)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(previous)


def pytest_report_header(config):
    import torch

    return (f"torch {torch.__version__}: {TORCH_THREADS} thread(s), CPU kernels "
            f"{torch.backends.cpu.get_cpu_capability()} (ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')})")


@pytest.fixture(autouse=True)
def _forget_declared_classes():
    """Classes a test's config declares join the taxonomy for the process: none may outlive its test."""
    yield
    from duplus.data import taxonomy

    taxonomy.declare_classes([])

"""Shared settings of the evaluation tests (one torch thread: the test machine is shared)."""

import torch

torch.set_num_threads(1)

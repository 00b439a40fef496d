"""Shared test configuration: Triton on CPU, per-dtype tolerances, the GPU marker."""

import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; this must be
# set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under `pytest -n 2` each worker already has a core: torch's own intra-op threads would
# oversubscribe the machine, and small ops then wait milliseconds for them (a [20000, 12]
# reference step took 11 s with two threads, 0.14 s with one).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

#: (rtol, atol) for values and log-probs computed from inputs of each dtype; arithmetic is fp32
#: throughout, so differences come from summation order and exp/log implementations only.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),
    torch.float16: (1e-5, 1e-5),
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Shared test configuration: Triton on CPU, per-dtype tolerances, the GPU marker."""

import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; this must be
# set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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

"""Fixtures of the decode_step tests: every backend, and one intra-op thread.

Tests that take ``backend`` run on "torch" (the reference), "triton" (through the interpreter on
CPU), the native "cpu" backend and "cuda" as each becomes available, with no edit to the tests.
"""

from __future__ import annotations

import os

import pytest
import torch

from haltkit.backends import BACKENDS, resolve_backend

#: True when Triton runs through its interpreter (one Python loop per program: slow per row).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


def backend_device(name: str) -> torch.device:
    """Where a backend's inputs live: CUDA for the GPU backends when a GPU is visible."""
    return torch.device("cuda" if name in ("triton", "cuda") and torch.cuda.is_available() else "cpu")


@pytest.fixture(params=BACKENDS)
def backend(request) -> tuple[str, torch.device]:
    """(backend name, device of its inputs); skips with the reason a backend is missing."""
    name = request.param
    dev = backend_device(name)
    try:
        resolve_backend(name, dev)
    except (RuntimeError, ValueError) as e:
        pytest.skip(str(e))
    return name, dev


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Run a module's tests with one intra-op thread, restoring the setting afterwards.

    Under ``pytest -n 2`` on two shared cores, torch's intra-op threads oversubscribe the machine
    and a small op waits milliseconds for them (measured: a [20000, 12] reference step took 11 s
    with two threads, 0.14 s with one). Modules opt in by importing this fixture.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

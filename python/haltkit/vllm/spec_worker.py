"""The worker extension that carries haltkit's speculative-decoding hooks into vLLM's worker processes.

vLLM's V1 model runner refuses custom logits processors with speculative decoding; the hooks of
:mod:`haltkit.vllm.spec_v1` lift that refusal, and they must act in the process where the model
runner lives: the engine core's, or a worker's of its own (the OpenAI server, ``LLM`` with
``VLLM_ENABLE_V1_MULTIPROCESSING=1``, tensor parallelism). vLLM resolves
``ParallelConfig.worker_extension_cls`` (``--worker-extension-cls``) by its qualified name in
every worker process before it builds the worker and its model runner; importing this module
there installs the hooks. So they exist only in engines whose configuration names this class,
which :func:`haltkit.vllm.engine_args` / :func:`haltkit.vllm.server_args` add when they are given
a ``speculative_config`` and vLLM will run its V1 runner: an engine that did not ask for haltkit
is never patched.
"""

from __future__ import annotations

from .spec_v1 import install_v1_spec_hooks

__all__ = ["SpecDecodeHooks"]


class SpecDecodeHooks:
    """vLLM worker extension (``worker_extension_cls``): its import installs haltkit's V1
    speculative-decoding hooks in the worker's process; vLLM mixes it into its worker class."""

    def haltkit_spec_hooks(self) -> bool:
        """True: for ``collective_rpc("haltkit_spec_hooks")``, to check the hooks reached every worker."""
        import vllm.v1.worker.gpu_model_runner as runner

        return bool(getattr(runner.build_logitsprocs, "_haltkit", False))


install_v1_spec_hooks()

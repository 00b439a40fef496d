"""Batched rollouts for any Hugging Face causal LM: think phases through ``haltkit.generate``,
then every forced-answer probe of a batch from one shared KV cache.

A batch of prompts is decoded by :func:`haltkit.generate` (seeded sampling, seed ``seed + i``
for prompt i, or greedy at temperature 0) with the model's exit tokens and the thinking budget.
One teacher-forced forward over prompt + think phase (:class:`haltkit.runner.ModelRunner`) then
gives the hidden state the head reads at every think step and fills a ragged KV cache; probes
(rollout b, checkpoint t) copy row b of that cache, write the exit tokens at position
``len(prompt_b) + t`` (the runner's mask hides everything past a query's position, so the rest of
the think phase is invisible) and read a greedy answer, ``probe_batch`` probes per forward.

:func:`collect` stores the rollouts in shards beside a manifest keyed by the model (config and
weights), the tokenizer, the task file and every setting; a rerun with the same key resumes, a
rerun with another key is refused (or starts afresh with ``restart=True``), never mixed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from ..params import ExitPolicy, SamplingParams
from ..runner import ModelRunner, RaggedKVCache, logits_and_hidden
from ..tasks import extract_answer
from .conventions import Conventions, model_identity, tokenizer_fingerprint
from .rollouts import Rollout, _save_shard, greedy_answers, load_rollouts

__all__ = ["RolloutConfig", "rollout_batch", "answer_of", "collect", "manifest_key", "weights_hash", "ManifestMismatch"]

MANIFEST = "manifest.json"


class ManifestMismatch(ValueError):
    """Stored rollouts were made with another model, tokenizer, task file or settings."""


@dataclass(frozen=True)
class RolloutConfig:
    """Settings of a rollout collection (all of them key the manifest).

    Fields:
        every: checkpoint spacing s in think tokens (0 and T are always probed).
        max_think: the thinking budget.
        max_answer: most answer tokens read per probe (EOS included).
        temperature, top_p: sampling of the think phase (temperature 0: greedy).
        seed: rollout i samples with seed ``seed + i``.
        batch_size: prompts per ``generate`` call.
        probe_batch: probes per forward.
        shard_size: rollouts per stored shard.
    """

    every: int = 2
    max_think: int = 320
    max_answer: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    probe_batch: int = 64
    shard_size: int = 32

    def __post_init__(self) -> None:
        for name in ("every", "max_think", "max_answer", "batch_size", "probe_batch", "shard_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")


def answer_of(tokenizer, conv: Conventions, tokens: list[int], max_answer: int | None = None) -> tuple[int, str]:
    """(think length T, answer text) of a generated reply: T tokens before the first
    ``think_close`` (or before EOS / the end when there is none); the answer is the text after the
    exit text (after ``think_close`` alone when the model wrote another prefix), up to EOS and,
    with ``max_answer``, within the ``len(exit_ids) + max_answer`` tokens from ``think_close``
    on: what a forced-answer probe reads, so that a reply and a probe are scored alike."""
    eos_at = next((i for i, t in enumerate(tokens) if t in conv.eos_ids), len(tokens))
    if conv.think_close_id not in tokens[:eos_at]:
        return eos_at, ""
    T = tokens.index(conv.think_close_id)
    end = eos_at if max_answer is None else min(eos_at, T + len(conv.exit_ids) + max_answer)
    text = tokenizer.decode(tokens[T:end])
    for head in (conv.exit_text, conv.think_close):
        if text.startswith(head):
            text = text[len(head):]
            break
    return T, extract_answer(text, "", conv.eos_texts)


def _answer_text(tokenizer, conv: Conventions, ids: list[int]) -> str:
    """The answer in tokens that follow the exit text (EOS and what follows cut)."""
    eos = set(conv.eos_ids)
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    return extract_answer(tokenizer.decode(ids[:cut]), "", conv.eos_texts)


@torch.no_grad()
def _hidden_and_cache(model, seqs: list[list[int]], capacity: int) -> tuple[ModelRunner, list[torch.Tensor]]:
    """One forward over every row's full sequence; the runner (its cache filled) and the hidden
    states [len(seq_b), d] float32 of each row."""
    dev = next(model.parameters()).device
    B, L = len(seqs), max(map(len, seqs))
    ids = torch.zeros(B, L, dtype=torch.int64, device=dev)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, device=dev)
    runner = ModelRunner(model, B, capacity)
    # Padding sits past each row's end: causal positions keep it out of every real query.
    positions = torch.arange(L, device=dev)[None, :].expand(B, L)
    runner.cache.write_pos, runner.cache.view_len = positions, L
    if runner.body is not None:  # the body alone: no [B, L, V] logits for a large vocabulary
        hidden = runner.body(input_ids=ids, position_ids=positions, use_cache=True, **{runner.cache_kw: runner.cache},
                             attention_mask=runner._mask(positions, L)).last_hidden_state
    else:
        _, hidden = runner.forward_at(ids, positions)
    return runner, [hidden[b, : len(s)].float().cpu() for b, s in enumerate(seqs)]


@torch.no_grad()
def _probe(model, base: ModelRunner, conv: Conventions, rows: torch.Tensor, cut: torch.Tensor, max_answer: int):
    """Greedy answers after the exit tokens for N probes: row ``rows[i]`` of ``base``'s cache cut
    at position ``cut[i]`` (prompt + t think tokens).

    Returns:
        (answer token lists, confidence [N] float32: geometric-mean probability, probe tokens [N]).
    """
    dev = rows.device
    N, E = rows.shape[0], len(conv.exit_ids)
    cache = RaggedKVCache(base.num_layers, N, base.capacity)
    cache.keys = [None if k is None else k.index_select(0, rows) for k in base.cache.keys]
    cache.values = [None if v is None else v.index_select(0, rows) for v in base.cache.values]
    runner = ModelRunner(model, N, base.capacity, cache=cache)
    exit_ids = torch.tensor(conv.exit_ids, dtype=torch.int64, device=dev).expand(N, E)
    logits, _ = runner.step(logits_and_hidden, exit_ids, cut, int(cut.max()) + E)
    logits = logits[:, -1].float()
    pos = cut + E

    def step(nxt: torch.Tensor) -> torch.Tensor:
        nonlocal pos
        logits, _ = runner.step(logits_and_hidden, nxt[:, None], pos, int(pos.max()) + 1)
        pos = pos + 1
        return logits[:, -1].float()

    out, logp, count = greedy_answers(logits, step, max_answer, torch.tensor(conv.eos_ids))
    answers = [[t for t in row if t >= 0] for row in out.tolist()]
    return answers, torch.exp(logp / count.clamp(min=1)).cpu(), (count + E).cpu()


@torch.no_grad()
def rollout_batch(model, tokenizer, conv: Conventions, task, problems: list, prompt_ids: list[list[int]],
                  cfg: RolloutConfig, first_index: int = 0, backend: str = "auto") -> list[Rollout]:
    """Think phases of a batch through :func:`haltkit.generate`, then every probe, batched.

    Args:
        problems, prompt_ids: the batch's problems and their rendered prompts.
        first_index: the index of ``problems[0]`` in the whole collection (its sampling seed offset).
    Returns:
        One :class:`Rollout` per problem.
    """
    from ..engine import generate

    E = len(conv.exit_ids)
    policy = ExitPolicy(eos_token_ids=conv.eos_ids, thinking_budget=cfg.max_think, exit_tokens=conv.exit_ids,
                        max_new_tokens=cfg.max_think + E + cfg.max_answer)
    sampling = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + first_index + i)
                for i in range(len(problems))]
    res = generate(model, input_ids=prompt_ids, exit=policy, sampling=sampling, backend=backend)
    thinks, naturals, closed = [], [], []
    for toks in res.tokens:
        T, natural = answer_of(tokenizer, conv, toks, cfg.max_answer)
        T = min(T, cfg.max_think)
        thinks.append(toks[:T])
        closed.append(T < len(toks) and toks[T] == conv.think_close_id and T < cfg.max_think)
        naturals.append(natural)
    seqs = [p + t for p, t in zip(prompt_ids, thinks)]
    capacity = max(map(len, seqs)) + E + cfg.max_answer + 1
    base, hidden = _hidden_and_cache(model, seqs, capacity)
    ckpts = [torch.unique(torch.cat([torch.arange(0, len(t) + 1, cfg.every), torch.tensor([len(t)])]))
             for t in thinks]
    # Every (row, checkpoint) probe of the batch, probe_batch per forward.
    dev = next(model.parameters()).device
    rows = torch.cat([torch.full((len(c),), b, dtype=torch.int64) for b, c in enumerate(ckpts)])
    cut = torch.cat([len(p) + c for p, c in zip(prompt_ids, ckpts)])
    answers, conf, probe = [], [], []
    for i in range(0, len(rows), cfg.probe_batch):
        a, c, n = _probe(model, base, conv, rows[i : i + cfg.probe_batch].to(dev), cut[i : i + cfg.probe_batch].to(dev),
                         cfg.max_answer)
        answers += a
        conf.append(c)
        probe.append(n)
    conf, probe = torch.cat(conf), torch.cat(probe)
    out, k = [], 0
    for b, (p, c) in enumerate(zip(problems, ckpts)):
        texts = [_answer_text(tokenizer, conv, a) for a in answers[k : k + len(c)]]
        reward = torch.tensor([task.verify(p, t) for t in texts], dtype=torch.float32)
        P = len(prompt_ids[b])
        out.append(Rollout(p, torch.tensor(thinks[b], dtype=torch.long), closed[b], naturals[b],
                           hidden[b][P - 1:], c, reward, conf[k : k + len(c)], probe[k : k + len(c)], texts))
        k += len(c)
    return out


def weights_hash(model) -> str:
    """A hash of the model's parameters (bytes of every tensor, in order)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_hash(path: str | os.PathLike | None) -> str | None:
    """sha256 of a file's bytes (the task file), or None."""
    if path is None:
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def manifest_key(model, tokenizer, conv: Conventions, cfg: RolloutConfig, task_id: dict, count: int) -> dict:
    """What a stored collection was made with: model identity and weights, tokenizer, conventions,
    the task (file hash, verifier) and the settings, and the number of prompts."""
    key = {"model": {**model_identity(model), "weights": weights_hash(model)},
           "tokenizer": tokenizer_fingerprint(tokenizer), "conventions": conv.to_dict(), "task": task_id,
           "settings": asdict(cfg), "prompts": count}
    return json.loads(json.dumps(key))  # as stored: tuples become lists


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: stored {str(x)[:60]!r}, now {str(y)[:60]!r}")
    return out


def _check_manifest(out_dir: str, key: dict, restart: bool) -> None:
    path = os.path.join(out_dir, MANIFEST)
    shards = sorted(f for f in os.listdir(out_dir) if f.startswith("shard_"))
    if os.path.exists(path):
        stored = json.load(open(path))["key"]
        diff = _diff(stored, key)
    elif shards:
        diff = [f"{len(shards)} shards without a manifest (an older collection)"]
    else:
        diff = []
    if diff and not restart:
        raise ManifestMismatch(
            f"{out_dir} holds rollouts made differently; they would be mixed with new ones: " + "; ".join(diff[:6])
            + ". Pass --restart (restart=True) to discard them, or choose another --out")
    if diff:
        for f in shards:
            os.remove(os.path.join(out_dir, f))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": "haltkit.rollouts/2", "key": key}, f, indent=1)
    os.replace(tmp, path)


def collect(model, tokenizer, conv: Conventions, task, problems: list, prompt_ids: list[list[int]],
            out_dir: str | os.PathLike, cfg: RolloutConfig, key: dict, restart: bool = False,
            progress: bool = True, log=None, backend: str = "auto") -> list[Rollout]:
    """Roll out every problem into shards under ``out_dir`` (resumable; see the module docstring).

    Args:
        key: from :func:`manifest_key`; a stored collection with another key is refused unless
            ``restart``.
        progress: a tqdm bar over prompts.
    Returns:
        The rollouts, in the order of ``problems``.
    Raises:
        ManifestMismatch: stored rollouts were made with another key and ``restart`` is False.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _check_manifest(out_dir, key, restart)
    n_shards = math.ceil(len(problems) / cfg.shard_size)
    paths = [os.path.join(out_dir, f"shard_{k:05d}.safetensors") for k in range(n_shards)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(problems), desc="rollouts", unit="prompt")
    try:
        for k, path in enumerate(paths):
            lo, hi = k * cfg.shard_size, min(len(problems), (k + 1) * cfg.shard_size)
            if not os.path.exists(path):
                shard = []
                for i in range(lo, hi, cfg.batch_size):
                    j = min(hi, i + cfg.batch_size)
                    shard += rollout_batch(model, tokenizer, conv, task, problems[i:j], prompt_ids[i:j], cfg, i,
                                           backend)
                _save_shard(path, shard)
                if log is not None:
                    acc = sum(float(r.reward[-1]) for r in shard) / len(shard)
                    log.write(json.dumps({"shard": k, "of": n_shards, "accuracy": round(acc, 3)}) + "\n")
                    log.flush()
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
    return load_rollouts(paths)

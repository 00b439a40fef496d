"""Train the toy reasoning models (``haltkit train-toy``): a ~1M-parameter Llama target and a
smaller draft, from scratch on CPU, on the built-in chain-sum traces.

Every example is a reasoning trace (prompt, think phase, ``</think>``, answer); a fraction
``forced_frac`` are forced-exit examples whose think phase is cut at a random character and
answered with what the partial work supports, so that a forced ``</think>`` mid-trace yields
the model's current best answer. Batches are grouped by length; the loss covers everything
after the prompt. The run is a function of its seed (same thread count, same machine).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Iterator, TextIO

import torch

from ..tasks import DIFFICULTIES, ChainSum, forced_exit_text, prompt_text, trace_text
from ..tokenizer import CharTokenizer

__all__ = [
    "ModelSpec", "TrainConfig", "MODEL_SPECS", "DEFAULT_RUNS", "build_model", "train_lm", "sample_example",
    "save_model", "train_toy", "evaluate", "fixed_check", "write_meta", "export_hf", "TOY_CHAT_TEMPLATE",
]

#: The toy's prompt layout as a chat template: the question after ``Q:``, thinking opened by the
#: generation prompt. Exported models carry it, so the Hugging Face path needs no haltkit code.
TOY_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}{% endif %}"
                     "{% endfor %}{% if add_generation_prompt %}<think>{% endif %}")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a Llama-config toy model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 512


#: The shipped runs' schedules: together about 26 minutes on the 2-core build machine
#: (`meta.json` records each run's measured time).
DEFAULT_RUNS = {"target": {"steps": 2000, "batch_size": 64},
                "draft": {"steps": 1000, "batch_size": 64}}
#: The shipped shapes: a ~1.08M-parameter target and a ~0.16M-parameter draft. The draft has one
#: layer: on a model this small a forward's cost is mostly per-layer dispatch, so a 3-layer
#: draft cost nearly what the 5-layer target does and batched speculation could not pay.
MODEL_SPECS = {
    "target": ModelSpec(hidden_size=128, intermediate_size=384, num_hidden_layers=5, num_attention_heads=4),
    "draft": ModelSpec(hidden_size=96, intermediate_size=384, num_hidden_layers=1, num_attention_heads=4),
}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one LM run (defaults are the shipped run's)."""

    steps: int = 1000
    stop_after: int | None = None  # stop early on the same schedule (None: run all steps)
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.05
    forced_frac: float = 0.15
    difficulties: tuple[int, ...] = tuple(DIFFICULTIES)
    group: int = 16  # batches drawn at once and grouped by length
    seed: int = 0


def build_model(spec: ModelSpec, vocab_size: int, seed: int):
    """A freshly initialised ``LlamaForCausalLM`` of ``spec`` (deterministic in ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = CharTokenizer()
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        num_key_value_heads=spec.num_attention_heads,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id,
        bos_token_id=None,
        **asdict(spec),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def sample_example(task: ChainSum, tok: CharTokenizer, rng: random.Random, cfg: TrainConfig) -> tuple[list[int], int]:
    """One training example from the training split: (token ids, number of prompt tokens)."""
    problem = task.sample(rng, rng.choice(cfg.difficulties), held_out=False)
    trace = task.trace(problem, rng)
    if rng.random() < cfg.forced_frac:
        text = forced_exit_text(problem, trace, rng.randint(0, len(trace.think)))
    else:
        text = trace_text(problem, trace)
    return tok.encode(text), len(tok.encode(prompt_text(problem)))


def _batches(tok: CharTokenizer, cfg: TrainConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Length-grouped (input_ids, labels) batches; labels are -100 on the prompt and padding."""
    rng = random.Random(cfg.seed)
    task = ChainSum()
    while True:
        pool = [sample_example(task, tok, rng, cfg) for _ in range(cfg.batch_size * cfg.group)]
        pool.sort(key=lambda e: len(e[0]))
        chunks = [pool[i : i + cfg.batch_size] for i in range(0, len(pool), cfg.batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), tok.pad_id, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            for i, (seq, n_prompt) in enumerate(chunk):
                ids[i, : len(seq)] = torch.tensor(seq)
                labels[i, n_prompt : len(seq)] = ids[i, n_prompt : len(seq)]
            yield ids, labels


def train_lm(model, cfg: TrainConfig, log: TextIO | None = None, log_every: int = 25,
             save_dir: str | os.PathLike | None = None, save_every: int = 100) -> dict:
    """Train ``model`` in place on chain-sum traces; returns a summary (final loss, tokens, seconds).

    Args:
        model: a ``LlamaForCausalLM`` from :func:`build_model`.
        cfg: the optimisation settings.
        log: where to write one JSON line of progress every ``log_every`` steps, or None.
        save_dir: where to save the model every ``save_every`` steps (a run cut short still
            leaves its latest weights), or None.
    """
    tok = CharTokenizer()
    torch.manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    start, tokens, ema = time.time(), 0, None
    last = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    for step, (ids, labels) in zip(range(last), _batches(tok, cfg)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int((ids != tok.pad_id).sum())
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if log is not None and (step % log_every == 0 or step == last - 1):
            el = time.time() - start
            log.write(json.dumps({"step": step, "loss": round(ema, 4), "lr": lr_at(step),
                                  "tokens": tokens, "seconds": round(el, 1), "tok_per_s": round(tokens / el)}) + "\n")
            log.flush()
        if save_dir is not None and step % save_every == save_every - 1:
            save_model(model, save_dir)
    model.eval()
    return {"steps": last, "final_loss_ema": ema, "tokens": tokens, "seconds": time.time() - start}


def save_model(model, directory: str | os.PathLike) -> None:
    """Write the model (safetensors) and the tokenizer into ``directory``."""
    model.save_pretrained(os.fspath(directory))
    CharTokenizer().save(directory)


def train_toy(
    out_dir: str | os.PathLike,
    which: tuple[str, ...] = ("target", "draft"),
    steps: int | None = None,
    seed: int = 0,
    log_path: str | os.PathLike | None = None,
) -> dict:
    """Train the toy models named in ``which`` and save each to ``out_dir/<name>/``.

    Args:
        out_dir: output directory; ``<name>/`` gets the weights, config and tokenizer.
        which: any of "target", "draft".
        steps: optimisation steps per model (default: :class:`TrainConfig`'s).
        seed: the seed of weights and data (the draft uses ``seed + 1`` for its weights only,
            so both see the same data stream).
        log_path: a file for JSON-lines progress, or None for stdout.
    Returns:
        {name: training summary}.
    """
    tok = CharTokenizer()
    summary = {}
    log = open(log_path, "a") if log_path else None
    try:
        for name in which:
            if name not in MODEL_SPECS:
                raise ValueError(f"unknown toy model {name!r}; expected one of {sorted(MODEL_SPECS)}")
            model = build_model(MODEL_SPECS[name], tok.vocab_size, seed + (name == "draft"))
            run = dict(DEFAULT_RUNS[name]) if steps is None else {"steps": steps}
            cfg = TrainConfig(seed=seed, **run)
            out = log or __import__("sys").stdout
            out.write(json.dumps({"model": name, "params": sum(p.numel() for p in model.parameters()),
                                  "config": asdict(cfg)}) + "\n")
            summary[name] = {**train_lm(model, cfg, out, save_dir=os.path.join(os.fspath(out_dir), name)),
                             "batch_size": cfg.batch_size, "threads": torch.get_num_threads()}
            save_model(model, os.path.join(os.fspath(out_dir), name))
            with open(os.path.join(os.fspath(out_dir), name, "train_summary.json"), "w") as f:
                json.dump(summary[name], f, indent=1)
    finally:
        if log is not None:
            log.close()
    return summary


def evaluate(model, problems: list, max_think: int = 320, batch_size: int = 64) -> dict:
    """Greedy accuracy and think length of ``model`` on ``problems``, overall and per difficulty.

    Returns:
        {"accuracy", "think_tokens" (mean), "closed" (fraction that closed thinking themselves),
        "per_difficulty": {level: {"n", "accuracy", "think_tokens"}}, "think": [T per problem],
        "correct": [0/1 per problem]}.
    """
    from ..state import Reason
    from .rollouts import think_greedy

    tok, task = CharTokenizer(), ChainSum()
    think, correct, closed = [], [], []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        for p, (ids, end, answer, _) in zip(chunk, think_greedy(model, tok, chunk, max_think)):
            think.append(len(ids))
            correct.append(int(task.verify(p, answer)))
            closed.append(end == Reason.MODEL)
    per = {}
    for level in sorted({p.difficulty for p in problems}):
        idx = [i for i, p in enumerate(problems) if p.difficulty == level]
        per[level] = {"n": len(idx), "accuracy": sum(correct[i] for i in idx) / len(idx),
                      "think_tokens": sum(think[i] for i in idx) / len(idx)}
    return {"accuracy": sum(correct) / len(correct), "think_tokens": sum(think) / len(think),
            "closed": sum(closed) / len(closed), "per_difficulty": per, "think": think, "correct": correct}


#: The fixed-seed check recorded with the shipped weights (tests/test_train.py reproduces it).
CHECK_SEED, CHECK_PROBLEMS = 1234, 20


def fixed_check(model) -> dict:
    """Accuracy and think lengths on a fixed set of held-out problems (one batch, greedy)."""
    from .head import sample_problems

    problems = sample_problems(ChainSum(), CHECK_PROBLEMS, CHECK_SEED, held_out=True)
    res = evaluate(model, problems, batch_size=CHECK_PROBLEMS)
    return {"seed": CHECK_SEED, "problems": CHECK_PROBLEMS, "accuracy": res["accuracy"],
            "think": res["think"], "correct": res["correct"]}


def write_meta(toy_dir: str | os.PathLike, training: dict, head_metrics: dict | None = None) -> dict:
    """Write ``toy_dir/meta.json``: how the toy models were made, and the fixed-seed check.

    Args:
        toy_dir: a directory with ``target/`` and ``draft/`` (and ``head.safetensors``).
        training: per model name, the run's summary (steps, batch size, tokens, seconds, ...).
        head_metrics: what :func:`haltkit.train.head.run_train_head` returned, or None.
    Returns:
        The metadata written.
    """
    from transformers import LlamaForCausalLM

    tok = CharTokenizer()
    target = LlamaForCausalLM.from_pretrained(os.path.join(os.fspath(toy_dir), "target")).eval()
    meta = {
        "models": {name: {"spec": asdict(MODEL_SPECS[name]), "seed": 0, "run": DEFAULT_RUNS[name],
                          **training.get(name, {})} for name in MODEL_SPECS},
        "tokenizer": {"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id,
                      "exit_tokens": list(tok.exit_tokens), "exit_text": "</think>A:"},
        "check": fixed_check(target),
    }
    if head_metrics is not None:
        meta["head"] = {k: head_metrics[k] for k in ("config", "best_epoch", "rollouts", "every", "max_think",
                                                     "rollout_accuracy") if k in head_metrics}
        meta["head"]["val"] = {k: head_metrics["val"][k] for k in ("mse", "target_var", "auroc_stop_loses_nothing",
                                                                   "examples")}
        meta["head"]["val"]["reliability_gap"] = head_metrics["val"]["reliability"]["weighted_gap"]
    with open(os.path.join(os.fspath(toy_dir), "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def export_hf(out_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> str:
    """Write the toy target as a plain Hugging Face model directory, without haltkit's tokenizer.

    The directory holds the weights, config and generation config, and a
    ``PreTrainedTokenizerFast`` with :data:`TOY_CHAT_TEMPLATE` and ``<think>`` / ``</think>`` as
    special tokens: ``AutoModelForCausalLM`` / ``AutoTokenizer`` load it like any model.

    Args:
        out_dir: the directory to write.
        source: a toy model directory (default: the shipped target).
    Returns:
        ``out_dir`` as a string.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from ..models import toy_dir

    src = os.fspath(source) if source is not None else os.fspath(toy_dir() / "target")
    out = os.fspath(out_dir)
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(out)
    tok = PreTrainedTokenizerFast.from_pretrained(src)
    tok.chat_template = TOY_CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out

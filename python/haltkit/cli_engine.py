"""The engine's command-line subcommands: ``haltkit generate`` and ``haltkit demo``.

``haltkit generate`` loads a local checkpoint directory (weights, config and tokenizer, as
``save_pretrained`` writes them; nothing is fetched from the hub) and runs
:func:`haltkit.generate` on the prompts given. ``haltkit demo`` runs it on the shipped toy
reasoning model (:func:`haltkit.load_toy`) with its draft and value head, several prices of time
in one batch; without the toy files it falls back to a random-weight Llama.
"""

from __future__ import annotations

import argparse
import json
import math
import random

import torch

__all__ = ["add_generate_args", "run_generate", "run_demo"]


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """The options of ``haltkit generate``."""
    p.add_argument("--model", required=True, help="a local checkpoint directory (config, weights, tokenizer)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--chat", action="store_true",
                   help="instruct models: wrap each prompt as a user turn with the tokenizer's chat template")
    p.add_argument("--value-head", default=None, help="a value head file; one written by train-head also gives the "
                   "chat template, exit text, EOS ids, thinking budget, lambda and patience (options override)")
    p.add_argument("--cost-of-time", type=float, default=None, help="lambda: the price of one more step")
    p.add_argument("--patience", type=int, default=None, help="default: the head's calibrated one, else "
                   "haltkit.DEFAULT_PATIENCE")
    p.add_argument("--thinking-budget", type=int, default=None, help="most thinking tokens (default: no budget)")
    p.add_argument("--exit-text", default=None, help="text forced at a thinking exit, e.g. '</think>A:'")
    p.add_argument("--draft", default=None, help="a draft checkpoint directory, 'ngram' or 'layer:L'")
    p.add_argument("--draft-len", type=int, default=4, help="K, the longest draft")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the head's, else 64")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--compile", action="store_true", help="compile the decode step (slow first call)")
    p.add_argument("--backend", default="auto", help="the epilogue's backend: auto, torch, triton, cpu, cuda")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _check_args(args: argparse.Namespace) -> None:
    """What can be refused before the model loads: paths, the draft, a price of time without a head.

    Raises:
        ValueError: naming the flag and its value.
    """
    import os

    from .drafts import as_draft_source

    if not os.path.isdir(args.model):
        what = "is a file, not a directory" if os.path.exists(args.model) else "does not exist"
        raise ValueError(f"--model {args.model}: the directory {what} (a local checkpoint directory is expected)")
    if args.value_head is not None and not os.path.isfile(args.value_head):
        raise ValueError(f"--value-head {args.value_head}: the file does not exist")
    if args.draft is not None and not os.path.isdir(args.draft):
        try:
            as_draft_source(args.draft, max_len=args.draft_len)
        except ValueError as e:
            raise ValueError(f"--draft {args.draft}: not a directory, and {e}") from None
    if args.cost_of_time is not None and args.value_head is None:
        raise ValueError(f"--cost-of-time {args.cost_of_time:g} prices time against a value head's predictions: "
                         "pass --value-head too")


def _encode_checked(tok, flag: str, text: str) -> list[int]:
    """``tok.encode(text)``; where it fails (a character outside a character-level tokenizer's
    alphabet: the toy's fails with "WordLevel error: Missing [UNK] token"), an error naming the
    flag, the character and its position."""
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        for i, ch in enumerate(text):
            try:
                tok.encode(ch, add_special_tokens=False)
            except Exception:  # noqa: BLE001
                raise ValueError(f"{flag} {text!r}: character {ch!r} at position {i} is not in the tokenizer's "
                                 "vocabulary") from None
        raise ValueError(f"{flag} {text!r}: the tokenizer cannot encode it ({e})") from None


def _chat_ids(tok, prompts: list[str]) -> list[list[int]]:
    """Each prompt as one user turn in the tokenizer's chat template, the assistant's turn opened."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("--chat: the model's tokenizer has no chat template (tokenizer_config.json chat_template)")
    return [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)) for p in prompts]


def _load_local(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


def run_generate(args: argparse.Namespace) -> int:
    """``haltkit generate``: load, generate, print the result table (or JSON)."""
    import os

    from . import ExitPolicy, SamplingParams, generate
    from .drafts import as_draft_source
    from .value_head import load_value_head

    _check_args(args)
    model, tok = _load_local(args.model)
    for text in args.prompt:
        _encode_checked(tok, "--prompt", text)
    if args.exit_text:
        _encode_checked(tok, "--exit-text", args.exit_text)
    head = load_value_head(args.value_head, model, tok) if args.value_head else None
    defaults = head.exit_defaults() if head is not None else {}
    # A checkpoint directory, else "ngram" or "layer:L" (anything else raises, saying what is accepted).
    draft = args.draft if args.draft is None or not os.path.isdir(args.draft) else _load_local(args.draft)[0]
    draft = as_draft_source(draft, max_len=args.draft_len)
    eos = tok.eos_token_id
    given = {"cost_of_time": args.cost_of_time, "patience": args.patience, "max_new_tokens": args.max_new_tokens,
             "thinking_budget": args.thinking_budget,
             "exit_tokens": tuple(tok.encode(args.exit_text, add_special_tokens=False)) if args.exit_text else None}
    policy = ExitPolicy(**{"max_new_tokens": 64, "eos_token_ids": () if eos is None else (eos,), **defaults,
                           **{k: v for k, v in given.items() if v is not None}})
    sampling = [SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed + i)
                for i in range(len(args.prompt))]
    conv = (head.meta or {}).get("conventions") if head is not None else None
    if conv:  # the head's chat template and thinking tag, rendered once (a templated prompt is used as is)
        from .tasks import Problem
        from .train.conventions import Conventions

        ids = Conventions.from_dict(conv).render_all(tok, [Problem(p, "") for p in args.prompt])
        prompt_kw = {"input_ids": ids}
    else:
        prompt_kw = {"prompts": args.prompt}
    if args.chat:
        prompt_kw = {"input_ids": _chat_ids(tok, args.prompt)}
    res = generate(model, **prompt_kw, tokenizer=tok, value_head=head, exit=policy, sampling=sampling,
                   draft=draft, compile=args.compile, backend=args.backend)
    print(json.dumps(res.to_dict(), indent=1) if args.json else res)
    return 0


def _toy_or_random(seed: int):
    """(target, draft, head, tokenizer, prompts, answers, exit policy factory, shipped?)."""
    from . import ExitPolicy, MarginalValueHead, load_toy

    try:
        toy = load_toy()
    except FileNotFoundError:
        toy = None
    if toy is not None:
        from .tasks import ChainSum, prompt_text

        rng = random.Random(seed)
        problems = [ChainSum().sample(rng, d, held_out=True) for d in (1, 2, 3, 4, 5, 3)]
        prompts = [prompt_text(p) for p in problems]
        return (toy.target, toy.draft, toy.head, toy.tokenizer, prompts, [p.answer for p in problems],
                lambda lam: toy.exit_policy(cost_of_time=lam), True)

    from transformers import LlamaConfig, LlamaForCausalLM

    from .tokenizer import CharTokenizer

    tok = CharTokenizer()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tok.vocab_size, intermediate_size=128, num_attention_heads=4, max_position_embeddings=256)
    target = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=4, **cfg)).eval()
    draft = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, **cfg)).eval()
    head = MarginalValueHead(64, hidden=16)
    prompts = [f"Q:{a}+{b}<think>" for a, b in ((3, 4), (12, 30), (7, 8), (50, 25), (1, 1), (9, 90))]

    def policy(lam):
        return ExitPolicy(cost_of_time=lam, max_new_tokens=48, eos_token_ids=(tok.eos_id,),
                          thinking_budget=40, exit_tokens=tok.exit_tokens)

    return target, draft, head, tok, prompts, [None] * len(prompts), policy, False


def run_demo(args: argparse.Namespace) -> int:
    """``haltkit demo``: one batched ``haltkit.generate`` with value exits and a draft model."""
    from . import DraftModel, SamplingParams, generate
    from .tasks import parse_answer

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    target, draft, head, tok, prompts, answers, policy, shipped = _toy_or_random(args.seed)
    if not shipped:
        print("(the shipped toy models are missing: running a random-weight Llama instead)")
    lambdas = [None, 0.0, 0.002, 0.01, 0.05, 0.2][: len(prompts)]
    sampling = [SamplingParams(temperature=0.0 if i % 2 == 0 else 0.7, top_p=0.95, seed=args.seed + i)
                for i in range(len(prompts))]
    res = generate(target, prompts=prompts, tokenizer=tok, value_head=head, exit=[policy(lam) for lam in lambdas],
                   sampling=sampling, draft=DraftModel(draft, max_len=4), backend=args.backend)
    print(res)
    print()
    print(f"{'seq':>3} {'lambda':>7} {'tokens':>6} {'finish':>7} {'answer':>8} {'expected':>8}")
    for b, lam in enumerate(lambdas):
        got = parse_answer(res.text[b])
        lam_s = "off" if lam is None else f"{lam:g}"
        print(f"{b:>3} {lam_s:>7} {res.num_steps[b]:>6} {res.finish_reason[b]:>7} {got[:8]:>8} {answers[b] or '-':>8}")
    acc = res.mean_accepted_length
    print(f"\ndraft tokens accepted per verification: {acc:.2f}" if not math.isnan(acc) else "")
    return 0

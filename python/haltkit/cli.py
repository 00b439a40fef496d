"""The ``haltkit`` command line: ``haltkit demo`` and ``haltkit backends``."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

import torch

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    """A small batched decode on CPU with a random-weight recurrent toy model.

    Each request has its own price of time; the table shows how each sequence ended.
    """
    from . import DecodeState, ExitPolicy, MarginalValueHead, Reason, SamplingParams, decode_step, pack_requests

    g = torch.Generator().manual_seed(args.seed)
    V, d = 64, 32
    emb = torch.randn(V, d, generator=g) / math.sqrt(d)
    rec = torch.randn(d, d, generator=g) / math.sqrt(d)
    head = MarginalValueHead(d, hidden=16)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lambdas = [None, -0.5, 0.0, 0.5]
    B = len(lambdas)
    think_end, answer = 2, 3  # toy ids of "</think>" and an answer prefix
    sampling = [SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, top_p=0.95, seed=args.seed + i) for i in range(B)]
    exits = [
        ExitPolicy(cost_of_time=lam, patience=2, min_new_tokens=4, max_new_tokens=args.max_new_tokens,
                   eos_token_ids=(1,), thinking_budget=args.max_new_tokens // 2, exit_tokens=(think_end, answer))
        for lam in lambdas
    ]
    req = pack_requests(sampling, exits, V)
    state = DecodeState.new(B)
    h = torch.zeros(B, d)
    tok = torch.zeros(B, dtype=torch.long)
    tokens: list[list[int]] = [[] for _ in range(B)]
    values: list[list[float]] = [[] for _ in range(B)]
    for _ in range(args.max_new_tokens):
        h = torch.tanh(h @ rec + emb[tok.clamp(min=0)])
        logits = 4.0 * h @ emb.T
        out = decode_step(logits, h, req, state, head, backend=args.backend)
        for b in range(B):
            if out.tokens[b] >= 0:
                tokens[b].append(int(out.tokens[b]))
            if not math.isnan(out.values[b]):
                values[b].append(float(out.values[b]))
        tok = out.tokens
        if int(out.num_active) == 0:
            break

    print(f"{'seq':>3} {'lambda':>7} {'steps':>5} {'think':>5} {'think end':>9} {'finish':>7} "
          f"{'value min/mean/max':>20}  tokens")
    for b in range(B):
        v = torch.tensor(values[b])
        lam = "off" if lambdas[b] is None else f"{lambdas[b]:+.2f}"
        vs = f"{v.min():+.2f}/{v.mean():+.2f}/{v.max():+.2f}" if len(v) else "-"
        shown = " ".join(map(str, tokens[b][:16])) + (" ..." if len(tokens[b]) > 16 else "")
        print(f"{b:>3} {lam:>7} {int(state.num_generated[b]):>5} {int(state.think_tokens[b]):>5} "
              f"{Reason(int(state.think_end[b])).name.lower():>9} "
              f"{Reason(int(state.finish_reason[b])).name.lower():>7} {vs:>20}  {shown}")
    return 0


def _backends(args: argparse.Namespace) -> int:
    from . import backends

    for name, why in backends().items():
        print(f"{name:>7}: {why}")
    return 0


def _train_toy(args: argparse.Namespace) -> int:
    from .train.toy import train_toy

    torch.set_num_threads(args.threads)
    summary = train_toy(args.out, tuple(args.which), args.steps, args.seed, args.log)
    print(summary)
    return 0


def _train_head(args: argparse.Namespace) -> int:
    from .tasks import ChainSum, JsonlTask
    from .train.head import HeadTrainConfig, run_train_head

    torch.set_num_threads(args.threads)
    task = JsonlTask(args.jsonl, args.verifier) if args.jsonl else ChainSum()
    if args.model is None:
        from .models import toy_dir

        args.model = str(toy_dir() / "target")
    cfg = HeadTrainConfig(hidden=args.hidden, seed=args.seed)
    metrics = run_train_head(args.model, args.out, task, args.prompts, args.every, args.max_think, cfg, sys.stdout,
                             args.worker, args.workers)
    if metrics is None:
        print(f"worker {args.worker}/{args.workers}: rollout shards collected; run with --workers 1 to fit the head")
        return 0
    val = metrics["val"]
    print(f"val mse {val['mse']:.3g} (target variance {val['target_var']:.3g}), "
          f"AUROC(stop loses nothing) {val['auroc_stop_loses_nothing']:.3f}, best epoch {metrics['best_epoch']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``haltkit`` command."""
    parser = argparse.ArgumentParser(prog="haltkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a small batched early-exit decode on CPU")
    demo.add_argument("--backend", default="auto")
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    be = sub.add_parser("backends", help="which backends are available here, and why not")
    be.set_defaults(func=_backends)
    toy = sub.add_parser("train-toy", help="train the toy reasoning target and draft models on CPU")
    toy.add_argument("--out", required=True, help="output directory (gets target/ and draft/)")
    toy.add_argument("--which", nargs="+", default=["target", "draft"], choices=["target", "draft"])
    toy.add_argument("--steps", type=int, default=None, help="optimisation steps per model")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--threads", type=int, default=2)
    toy.add_argument("--log", default=None, help="JSON-lines progress file (default stdout)")
    toy.set_defaults(func=_train_toy)
    th = sub.add_parser("train-head", help="roll out a model with forced answers and fit the value head")
    th.add_argument("--out", required=True, help="output directory (rollouts/, head.safetensors, head_metrics.json)")
    th.add_argument("--model", default=None, help="a Hugging Face model directory (default: the shipped toy target)")
    th.add_argument("--jsonl", default=None, help="a JSONL of prompt/answer pairs instead of the built-in chain sums")
    th.add_argument("--verifier", default="numeric", choices=["numeric", "exact"])
    th.add_argument("--prompts", type=int, default=1000)
    th.add_argument("--every", type=int, default=2, help="checkpoint spacing s in think tokens")
    th.add_argument("--max-think", type=int, default=320, help="thinking budget of the rollouts")
    th.add_argument("--hidden", type=int, default=32, help="head MLP width (0 = linear)")
    th.add_argument("--seed", type=int, default=0)
    th.add_argument("--threads", type=int, default=2)
    th.add_argument("--worker", type=int, default=0, help="this process's share of the rollout shards")
    th.add_argument("--workers", type=int, default=1, help="processes sharing the rollouts (1: also fit the head)")
    th.set_defaults(func=_train_head)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

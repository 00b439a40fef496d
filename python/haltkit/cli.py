"""The ``haltkit`` command line: ``demo``, ``generate``, ``backends``, ``train-toy``, ``train-head``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .cli_engine import run_demo

    return run_demo(args)


def _generate(args: argparse.Namespace) -> int:
    from .cli_engine import run_generate

    return run_generate(args)


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
    demo = sub.add_parser("demo", help="haltkit.generate on the shipped toy model: value exits and a draft")
    demo.add_argument("--backend", default="auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    gen = sub.add_parser("generate", help="generate from a local checkpoint with value exits and speculation")
    from .cli_engine import add_generate_args

    add_generate_args(gen)
    gen.set_defaults(func=_generate)
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

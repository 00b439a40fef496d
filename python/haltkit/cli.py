"""The ``haltkit`` command line: ``demo``, ``generate``, ``backends``, ``train-toy``, ``train-head``,
``eval-exits``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

__all__ = ["main"]


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default where it has one (not for None or a flag left off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # By identity: a default of 0 or 0.0 compares equal to False, and is worth showing.
        if not any(action.default is x for x in (None, False, argparse.SUPPRESS)) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _user_errors(command: str, run, args: argparse.Namespace) -> int:
    """Run a subcommand; a refused input (ValueError, TypeError, a missing file) prints one line
    and exits 2, as argparse does for a bad flag, instead of a traceback."""
    try:
        return run(args)
    except (ValueError, TypeError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"haltkit {command}: error: {msg}", file=sys.stderr)
        return 2


def _demo(args: argparse.Namespace) -> int:
    from .cli_engine import run_demo

    return _user_errors("demo", run_demo, args)


def _generate(args: argparse.Namespace) -> int:
    from .cli_engine import run_generate

    return _user_errors("generate", run_generate, args)


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


def _task_and_problems(args: argparse.Namespace, held_out: bool = False):
    """The task, its problems and the manifest's name for it, from ``--jsonl``, ``--reasoning-gym``
    or the chain sums."""
    from .tasks import ChainSum, JsonlTask, ReasoningGymTask
    from .train.head import sample_problems
    from .train.pipeline import file_hash

    if args.jsonl and args.reasoning_gym:
        raise ValueError(f"--jsonl {args.jsonl} and --reasoning-gym {args.reasoning_gym}: give one task source")
    if args.jsonl:
        task = JsonlTask(args.jsonl, args.verifier)
        problems = task.problems[: args.prompts] if args.prompts else task.problems
        return task, problems, {"file": file_hash(args.jsonl), "verifier": args.verifier}
    if args.reasoning_gym:
        # Held-out problems for eval-exits come from another seed of the generator.
        task = ReasoningGymTask(args.reasoning_gym, args.prompts or 1000, args.seed + (1_000_003 if held_out else 0))
        return task, task.problems, task.task_id()
    task = ChainSum()
    problems = sample_problems(task, args.prompts or 1000, args.seed, held_out=held_out)
    return task, problems, {"builtin": "chain_sum", "seed": args.seed, "held_out": held_out}


def _conventions(args: argparse.Namespace) -> dict:
    out = {"chat_template": args.chat_template}
    for name in ("think_open", "think_close", "exit_text"):
        v = getattr(args, name)
        if v is not None:
            out[name] = v.encode().decode("unicode_escape")  # "\n\n" on a command line means two newlines
    if args.eos_id:
        out["eos_ids"] = tuple(args.eos_id)
    if not args.jsonl and not args.reasoning_gym and args.chat_template == "auto":  # the built-in chain sums
        from .train.toy import TOY_CHAT_TEMPLATE

        out["chat_template"] = TOY_CHAT_TEMPLATE
        out.setdefault("exit_text", "</think>A:")
    return out


def _train_head(args: argparse.Namespace) -> int:
    from .train.head import HeadTrainConfig, run_train_head
    from .train.pipeline import RolloutConfig

    torch.set_num_threads(args.threads)
    if args.model is None:
        from .models import toy_dir

        args.model = str(toy_dir() / "target")
    task, problems, task_id = _task_and_problems(args)
    rc = RolloutConfig(every=args.every, max_think=args.max_think, max_answer=args.max_answer,
                       temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                       probe_batch=args.probe_batch, shard_size=args.batch_size)
    cfg = HeadTrainConfig(hidden=args.hidden, seed=args.seed)
    metrics, status = run_train_head(args.model, args.out, task, problems, task_id, rc, cfg, _conventions(args),
                                     args.gguf_file, args.val_frac, args.test_frac, args.restart, sys.stdout,
                                     progress=not args.no_progress)
    val = metrics["val"]
    print(f"rollout accuracy {metrics['rollout_accuracy']:.3f} over {sum(metrics['split'].values())} prompts "
          f"(split {metrics['split']})")
    print(f"val mse {val['mse']:.3g} (constant predictor {val['mse_constant']:.3g}), "
          f"AUROC(stop loses nothing) {val['auroc_stop_loses_nothing']:.3f}, best epoch {metrics['best_epoch']}")
    t = metrics["test"]
    print(f"test: no exit accuracy {t['no_exit']['accuracy']:.3f} at {t['no_exit']['think_tokens']:.1f} think tokens")
    for name in ("no_loss", "within_1pt"):
        if name in t:
            print(f"test: {name} (lambda {t[name]['cost_of_time']:.4g}, patience {t[name]['patience']}): accuracy "
                  f"{t[name]['accuracy']:.3f} at {t[name]['think_tokens']:.1f} think tokens")
    if status != 0:
        print("quality gate: the head is UNFIT, written as " + metrics["head_file"] + ":\n  "
              + "\n  ".join(metrics["fit"]["reasons"]), file=sys.stderr)
    else:
        print("head written to " + metrics["head_file"])
    return status


def _eval_exits(args: argparse.Namespace) -> int:
    from .train.evaluate import eval_exits

    torch.set_num_threads(args.threads)
    task, problems, _ = _task_and_problems(args, held_out=True)
    result = eval_exits(args.model, args.value_head, task, problems, args.out, gguf_file=args.gguf_file,
                        batch_size=args.batch_size, check_generate=not args.no_generate_check,
                        progress=not args.no_progress, allow_unfit=args.allow_unfit)
    print(result["markdown"])
    print(f"written: {result['files']}")
    return 0


def _add_task_args(p: argparse.ArgumentParser) -> None:
    from .tasks import VERIFIERS

    p.add_argument("--jsonl", default=None, help="a JSONL task file: {prompt|messages, answer, level?} per line "
                   "(default: the built-in chain sums)")
    p.add_argument("--reasoning-gym", default=None, metavar="DATASET",
                   help="a reasoning-gym dataset (pip install 'haltkit[reasoning-gym]'), scored by its own scorer; "
                   "--prompts entries from --seed (eval-exits: another seed)")
    p.add_argument("--verifier", default="numeric",
                   help=f"one of {', '.join(VERIFIERS)}, or module:function (a callable (answer, problem) -> score)")
    p.add_argument("--prompts", type=int, default=None, help="use the first N problems (chain sums: how many)")
    p.add_argument("--gguf-file", default=None, help="a GGUF file inside --model (needs the gguf package)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``haltkit`` command."""
    parser = argparse.ArgumentParser(prog="haltkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="haltkit.generate on the shipped toy model: value exits and a draft",
                          formatter_class=_Help)
    demo.add_argument("--backend", default="auto", help="the epilogue's backend: auto, torch, triton, cpu, cuda")
    demo.add_argument("--seed", type=int, default=0, help="picks the problems and the sampled rows' seeds")
    demo.set_defaults(func=_demo)
    gen = sub.add_parser("generate", help="generate from a local checkpoint with value exits and speculation",
                         formatter_class=_Help)
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
    th = sub.add_parser("train-head", help="roll out a model with forced answers, fit and calibrate the value head")
    th.add_argument("--out", required=True, help="output directory (rollouts/, head.safetensors, head_metrics.json)")
    th.add_argument("--model", default=None, help="a Hugging Face model directory (default: the shipped toy target)")
    _add_task_args(th)
    th.add_argument("--chat-template", default="auto",
                    help="'auto' (the tokenizer's, if any), 'none', or a Jinja template source")
    th.add_argument("--think-open", default=None, help="text that opens thinking (default <think> if a token)")
    th.add_argument("--think-close", default=None, help="the one token that closes thinking (default </think>)")
    th.add_argument("--exit-text", default=None, help="forced at an exit (default: think-close + '\\n\\n')")
    th.add_argument("--eos-id", type=int, action="append", default=None, help="EOS id (repeat; default: the "
                    "generation config's)")
    th.add_argument("--every", type=int, default=2, help="probe spacing in think tokens")
    th.add_argument("--max-think", type=int, default=320, help="thinking budget of the rollouts")
    th.add_argument("--max-answer", type=int, default=16, help="answer tokens read per probe")
    th.add_argument("--temperature", type=float, default=0.0, help="think-phase sampling (0: greedy); rollout i "
                    "samples with seed --seed + i")
    th.add_argument("--probe-batch", type=int, default=64, help="forced-answer probes per forward")
    th.add_argument("--hidden", type=int, default=32, help="head MLP width (0 = linear)")
    th.add_argument("--val-frac", type=float, default=0.15, help="questions for early stopping and calibration")
    th.add_argument("--test-frac", type=float, default=0.15, help="questions for the reported figures")
    th.add_argument("--restart", action="store_true", help="discard stored rollouts made with other settings")
    th.set_defaults(func=_train_head)
    ev = sub.add_parser("eval-exits", help="accuracy against think tokens: the head across lambda, fixed budgets, "
                        "no exit and the oracle (table + PNG)")
    ev.add_argument("--model", required=True, help="a Hugging Face model directory")
    ev.add_argument("--value-head", required=True, help="a head written by train-head")
    ev.add_argument("--out", required=True, help="directory for eval_exits.{json,md,png}")
    ev.add_argument("--allow-unfit", action="store_true", help="evaluate a head the quality gate marked unfit")
    ev.add_argument("--no-generate-check", action="store_true", help="skip the haltkit.generate run that checks "
                    "the replayed default operating point")
    _add_task_args(ev)
    ev.set_defaults(func=_eval_exits)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

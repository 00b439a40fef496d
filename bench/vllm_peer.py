"""Plain vLLM as a peer contender of ``bench/e2e_real.py``, run inside the project's vLLM environment.

Started by the bench as a subprocess with that environment's python (``bash scripts/vllm_env.sh``
prints it); vLLM pins its own dependencies, so it never runs in the bench's own process. Protocol,
one JSON object per line: the first line on stdin configures the engine
(``{"model": dir, "dtype": "float32", "threads": 2, "max_model_len": 512, "gguf": path or null,
"eager": true}``: eager skips vLLM's torch.compile warm-up, minutes on 2 busy cores);
it answers ``{"ready": true, "load_s": ..., "model": what it loaded, "gguf_error": why the GGUF was
refused or null}``. Then each line is a request
(``{"prompts": [[ids]], "new": n, "temperature": t, "top_p": p, "seed": s}``), answered with
``{"seconds": ..., "cpu_seconds": ... (this process's, all threads), "tokens": [[ids]]}``; an empty
line ends it. Nothing here is haltkit: this is
vLLM as a CPU user would run it (``LLM.generate``), EOS ignored so that every contender emits the
same number of tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    cfg = json.loads(sys.stdin.readline())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process, no engine-core spawn
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")   # the cores are shared; do not pin
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")           # GiB
    import torch
    from vllm import LLM, SamplingParams

    torch.set_num_threads(int(cfg["threads"]))
    kw = dict(dtype=cfg["dtype"], max_model_len=int(cfg["max_model_len"]), enforce_eager=bool(cfg.get("eager", False)),
              seed=0)
    t0 = time.perf_counter()
    gguf_error, llm, loaded = None, None, cfg["model"]
    if cfg.get("gguf"):
        try:
            llm = LLM(model=cfg["gguf"], tokenizer=cfg["model"], **kw)
            loaded = cfg["gguf"]
        except Exception as e:  # reported, then the dequantized checkpoint of the same weights
            gguf_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            try:
                import gguf  # noqa: F401
            except ImportError:
                gguf_error += " (the vLLM environment has no `gguf` package, which vLLM's GGUF loader needs)"
    if llm is None:
        llm = LLM(model=cfg["model"], **kw)
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - t0, "model": loaded,
                      "gguf_error": gguf_error}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        params = [SamplingParams(max_tokens=req["new"], min_tokens=req["new"], ignore_eos=True,
                                 temperature=req["temperature"], top_p=req["top_p"], seed=req["seed"] + b)
                  for b in range(len(req["prompts"]))]
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate([{"prompt_token_ids": p} for p in req["prompts"]], params, use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "tokens": [list(o.outputs[0].token_ids) for o in outs]}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

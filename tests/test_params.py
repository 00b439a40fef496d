"""Request parameters, their packing, and the boundary checks of ``haltkit.decode_step``.

Every bad input must fail where it enters, with an error that names the field, the offending
value and (where known) the request index; good input must pack exactly as documented.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import haltkit
from haltkit import DEFAULT_PATIENCE, DecodeState, ExitPolicy, MarginalValueHead, Reason, SamplingParams, pack_requests

# ---------------------------------------------------------------------------------------------
# SamplingParams / ExitPolicy: each bad value names its field and the value.
# ---------------------------------------------------------------------------------------------

BAD_SAMPLING = [
    # (kwargs, field named in the message, value as printed in the message)
    (dict(temperature=-0.5), "temperature", "-0.5"),
    (dict(temperature=math.nan), "temperature", "nan"),
    (dict(temperature=math.inf), "temperature", "inf"),
    (dict(temperature=-math.inf), "temperature", "-inf"),
    (dict(temperature=1e-39), "temperature", "1e-39"),  # would round to 0 (greedy) in float32
    (dict(temperature=1e39), "temperature", "1e+39"),  # would round to inf in float32
    (dict(temperature=True), "temperature", "True"),
    (dict(temperature="0.7"), "temperature", "'0.7'"),
    (dict(temperature=None), "temperature", "None"),
    (dict(top_p=0.0), "top_p", "0.0"),
    (dict(top_p=-0.1), "top_p", "-0.1"),
    (dict(top_p=1.0001), "top_p", "1.0001"),
    (dict(top_p=math.nan), "top_p", "nan"),
    (dict(top_p=math.inf), "top_p", "inf"),
    (dict(top_p=False), "top_p", "False"),
    (dict(min_p=-0.01), "min_p", "-0.01"),
    (dict(min_p=1.5), "min_p", "1.5"),
    (dict(min_p=math.nan), "min_p", "nan"),
    (dict(min_p=True), "min_p", "True"),
    (dict(top_k=-1), "top_k", "-1"),
    (dict(top_k=2**31), "top_k", str(2**31)),  # int32 on the device
    (dict(top_k=5.0), "top_k", "5.0"),
    (dict(top_k=True), "top_k", "True"),
    (dict(seed=-1), "seed", "-1"),
    (dict(seed=2**63), "seed", str(2**63)),
    (dict(seed=1.0), "seed", "1.0"),
    (dict(seed=False), "seed", "False"),
]


BAD_EXIT = [
    (dict(max_new_tokens=0), "max_new_tokens", "0"),
    (dict(max_new_tokens=-3), "max_new_tokens", "-3"),
    (dict(max_new_tokens=2**31), "max_new_tokens", str(2**31)),
    (dict(max_new_tokens=8.0), "max_new_tokens", "8.0"),
    (dict(patience=0), "patience", "0"),
    (dict(patience=True), "patience", "True"),
    (dict(min_new_tokens=-1), "min_new_tokens", "-1"),
    (dict(thinking_budget=0), "thinking_budget", "0"),
    (dict(thinking_budget=2.5), "thinking_budget", "2.5"),
    (dict(cost_of_time=math.nan), "cost_of_time", "nan"),
    (dict(cost_of_time=math.inf), "cost_of_time", "inf"),
    (dict(cost_of_time=-1e39), "cost_of_time", "-1e+39"),  # would round to -inf ("off") in float32
    (dict(cost_of_time=True), "cost_of_time", "True"),
    (dict(cost_of_time="0.1"), "cost_of_time", "'0.1'"),
    (dict(eos_token_ids=2), "eos_token_ids", "2"),
    (dict(eos_token_ids="2"), "eos_token_ids", "'2'"),
    (dict(eos_token_ids=(2, -1)), "eos_token_ids[1]", "-1"),
    (dict(eos_token_ids=(True,)), "eos_token_ids[0]", "True"),
    (dict(exit_tokens=(7, 2.0)), "exit_tokens[1]", "2.0"),
    (dict(exit_tokens=(-5,)), "exit_tokens[0]", "-5"),
    (dict(exit_tokens=(2**31,)), "exit_tokens[0]", str(2**31)),
    (dict(exit_tokens={3}), "exit_tokens", "{3}"),  # a set has no order to force in
]


BAD_PARAMS = [(SamplingParams, *case) for case in BAD_SAMPLING] + [(ExitPolicy, *case) for case in BAD_EXIT]


@pytest.mark.parametrize("cls, kwargs, field, shown", BAD_PARAMS,
                         ids=[f"{c.__name__}.{f}={s}" for c, _, f, s in BAD_PARAMS])
def test_bad_parameter_names_field_and_value(cls, kwargs, field, shown):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    msg = str(err.value)
    assert msg.startswith(field), msg
    assert shown in msg, msg


def test_boundary_values_are_accepted():
    SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    SamplingParams(temperature=1e-30, top_k=2**31 - 1, top_p=1e-6, min_p=1.0, seed=2**63 - 1)
    SamplingParams(temperature=5, top_p=1, min_p=0)  # ints where floats are expected are fine
    ExitPolicy(cost_of_time=-1.0, patience=1, min_new_tokens=0, max_new_tokens=1, thinking_budget=1)
    ExitPolicy(cost_of_time=0, eos_token_ids=[0, 2**31 - 1], exit_tokens=[5, 5])


def test_params_are_frozen_and_hashable():
    s, e = SamplingParams(seed=3), ExitPolicy(eos_token_ids=[2, 3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.patience = 2  # type: ignore[misc]
    assert e.eos_token_ids == (2, 3)  # a list is stored as a tuple
    assert hash(e) == hash(ExitPolicy(eos_token_ids=(2, 3)))
    assert len({s, SamplingParams(seed=3)}) == 1


def test_documented_defaults():
    assert SamplingParams() == SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=None)
    assert not SamplingParams().greedy and SamplingParams(temperature=0).greedy
    assert ExitPolicy() == ExitPolicy(
        cost_of_time=None, patience=DEFAULT_PATIENCE, min_new_tokens=0, max_new_tokens=256,
        eos_token_ids=(), thinking_budget=None, exit_tokens=(),
    )


def test_unseeded_rows_get_fresh_seeds_and_seeded_rows_keep_theirs():
    """As vLLM: one unseeded SamplingParams for a batch gives every sampled row its own seed, new
    on every packing, without touching torch's random state; seeded rows keep theirs."""
    unseeded, seeded = SamplingParams(temperature=1.5), SamplingParams(temperature=1.5, seed=7)
    a = pack_requests(unseeded, ExitPolicy(), 10, batch_size=64).seed.tolist()
    b = pack_requests(unseeded, ExitPolicy(), 10, batch_size=64).seed.tolist()
    assert len(set(a)) == 64 and not set(a) & set(b)  # 2**63 values: a collision is a bug
    assert all(0 <= s < 2**63 for s in a)
    assert pack_requests([seeded, unseeded, seeded], ExitPolicy(), 10).seed.tolist()[::2] == [7, 7]
    torch.manual_seed(3)  # fresh means fresh: not replayed by torch's seed, nor moving it
    c = pack_requests(unseeded, ExitPolicy(), 10, batch_size=4).seed.tolist()
    state = torch.get_rng_state()
    torch.manual_seed(3)
    assert not set(pack_requests(unseeded, ExitPolicy(), 10, batch_size=4).seed.tolist()) & set(c)
    assert torch.equal(torch.get_rng_state(), state)


def test_unknown_keyword_raises():
    with pytest.raises(TypeError, match="topk"):
        SamplingParams(topk=5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="max_tokens"):
        ExitPolicy(max_tokens=5)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------------------
# pack_requests
# ---------------------------------------------------------------------------------------------

REQUEST_DTYPES = {
    "temperature": torch.float32, "top_k": torch.int32, "top_p": torch.float32, "min_p": torch.float32,
    "seed": torch.int64, "cost_of_time": torch.float32, "patience": torch.int32,
    "min_new_tokens": torch.int32, "max_new_tokens": torch.int32, "thinking_budget": torch.int32,
    "eos_ids": torch.int32, "exit_tokens": torch.int32, "exit_len": torch.int32,
}


def _mixed_requests() -> tuple[list[SamplingParams], list[ExitPolicy]]:
    samp = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, seed=2**63 - 1),
        SamplingParams(temperature=1.3, seed=12345678901),
        SamplingParams(top_p=0.5, seed=7),
    ]
    exits = [
        ExitPolicy(),
        ExitPolicy(cost_of_time=0.25, patience=3, min_new_tokens=4, max_new_tokens=100,
                   eos_token_ids=(2, 9), thinking_budget=50, exit_tokens=(30, 31, 2)),
        ExitPolicy(cost_of_time=-2.0, eos_token_ids=(0,)),
        ExitPolicy(max_new_tokens=1, exit_tokens=(5,)),
    ]
    return samp, exits


def test_pack_requests_lays_out_documented_fields():
    samp, exits = _mixed_requests()
    r = pack_requests(samp, exits, vocab_size=32)
    assert r.batch_size == 4
    for name, dtype in REQUEST_DTYPES.items():
        t = getattr(r, name)
        assert t.dtype == dtype, name
        assert t.shape[0] == 4 and t.device.type == "cpu", name
    f32 = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    assert torch.equal(r.temperature, f32([0.0, 0.7, 1.3, 1.0]))
    assert r.top_k.tolist() == [0, 40, 0, 0]
    assert torch.equal(r.top_p, f32([1.0, 0.9, 1.0, 0.5]))
    assert torch.equal(r.min_p, f32([0.0, 0.05, 0.0, 0.0]))
    assert r.seed.tolist() == [0, 2**63 - 1, 12345678901, 7]
    assert torch.equal(r.cost_of_time, f32([-math.inf, 0.25, -2.0, -math.inf]))  # None -> -inf (off)
    assert r.patience.tolist() == [DEFAULT_PATIENCE, 3, DEFAULT_PATIENCE, DEFAULT_PATIENCE]
    assert r.min_new_tokens.tolist() == [0, 4, 0, 0]
    assert r.max_new_tokens.tolist() == [256, 100, 256, 1]
    assert r.thinking_budget.tolist() == [0, 50, 0, 0]  # None -> 0 (no budget)
    assert r.eos_ids.tolist() == [[-1, -1], [2, 9], [0, -1], [-1, -1]]
    assert r.exit_tokens.tolist() == [[-1, -1, -1], [30, 31, 2], [-1, -1, -1], [5, -1, -1]]
    assert r.exit_len.tolist() == [0, 3, 0, 1]


def test_pack_requests_without_any_ids_keeps_one_padding_column():
    r = pack_requests(SamplingParams(), ExitPolicy(), vocab_size=5, batch_size=2)
    assert r.eos_ids.tolist() == [[-1], [-1]]
    assert r.exit_tokens.tolist() == [[-1], [-1]]


def test_pack_requests_broadcasts_single_values():
    samp, exits = _mixed_requests()
    a = pack_requests(samp[1], exits, vocab_size=32)
    assert a.batch_size == 4 and a.top_k.tolist() == [40] * 4
    b = pack_requests(samp, exits[1], vocab_size=32)
    assert b.exit_len.tolist() == [3] * 4
    c = pack_requests(samp[1], exits[1], vocab_size=32, batch_size=3)
    assert c.batch_size == 3 and c.eos_ids.tolist() == [[2, 9]] * 3


@pytest.mark.parametrize("field", ["eos_token_ids", "exit_tokens"])
def test_token_outside_vocabulary_names_request_field_and_value(field):
    samp, exits = _mixed_requests()
    exits[2] = ExitPolicy(**{field: (3, 1, 40)})
    with pytest.raises(ValueError) as err:
        pack_requests(samp, exits, vocab_size=40)
    msg = str(err.value)
    assert "request 2" in msg and f"{field}[2]" in msg and "40" in msg and "[0, 40)" in msg, msg
    pack_requests(samp, exits, vocab_size=41)  # the same ids fit a larger vocabulary


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: pack_requests([SamplingParams()] * 2, [ExitPolicy()] * 3, 10), ValueError, ["exits", "2", "3"]),
        (lambda: pack_requests([SamplingParams()] * 3, [ExitPolicy()] * 2, 10), ValueError, ["3", "2"]),
        (lambda: pack_requests([SamplingParams()] * 2, ExitPolicy(), 10, batch_size=3), ValueError, ["sampling", "3", "2"]),
        (lambda: pack_requests(SamplingParams(), ExitPolicy(), 10), ValueError, ["batch_size"]),
        (lambda: pack_requests(SamplingParams(), ExitPolicy(), 10, batch_size=0), ValueError, ["batch_size", "0"]),
        (lambda: pack_requests(SamplingParams(), ExitPolicy(), 10, batch_size=True), ValueError, ["batch_size", "True"]),
        (lambda: pack_requests([], [], 10), ValueError, ["at least one request"]),
        (lambda: pack_requests([SamplingParams()], [ExitPolicy()], 0), ValueError, ["vocab_size", "0"]),
        (lambda: pack_requests([SamplingParams()], [ExitPolicy()], 10.0), ValueError, ["vocab_size", "10.0"]),
        (lambda: pack_requests([SamplingParams()], [ExitPolicy()], True), ValueError, ["vocab_size", "True"]),
        (lambda: pack_requests(None, ExitPolicy(), 10), TypeError, ["sampling", "NoneType"]),
        (lambda: pack_requests([SamplingParams()], "exit", 10), TypeError, ["exits", "str"]),
        (lambda: pack_requests([SamplingParams()], {"patience": 2}, 10), TypeError, ["exits", "dict"]),
        (lambda: pack_requests([SamplingParams(), ExitPolicy()], [ExitPolicy()] * 2, 10), TypeError,
         ["request 1", "sampling", "ExitPolicy"]),
        (lambda: pack_requests([SamplingParams()] * 2, [ExitPolicy(), None], 10), TypeError,
         ["request 1", "exits", "NoneType"]),
        (lambda: pack_requests([dict(temperature=0)], [ExitPolicy()], 10), TypeError, ["request 0", "dict"]),
    ],
    ids=["exits-longer", "sampling-longer", "batch-size-mismatch", "single-needs-batch-size", "batch-size-0",
         "batch-size-bool", "empty", "vocab-0", "vocab-float", "vocab-bool", "sampling-none", "exits-str",
         "exits-dict", "wrong-entry-type", "none-entry", "dict-entry"],
)
def test_pack_requests_rejects_bad_arguments(call, exc, words):
    with pytest.raises(exc) as err:
        call()
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_request_batch_index_select_equals_packing_the_selection():
    samp, exits = _mixed_requests()
    r = pack_requests(samp, exits, vocab_size=32)
    order = [3, 1, 1, 0]
    picked = r.index_select(torch.tensor(order))
    direct = pack_requests([samp[i] for i in order], [exits[i] for i in order], vocab_size=32)
    for a, b in zip(picked.tensors(), direct.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert r.index_select(torch.tensor([], dtype=torch.int64)).batch_size == 0


def test_request_batch_token_end_is_known_at_packing_and_kept_by_compaction():
    req = pack_requests(SamplingParams(), [ExitPolicy(eos_token_ids=(4,)), ExitPolicy(exit_tokens=(9, 2))], 12)
    assert req.token_end() == 10
    sub = req.index_select(torch.tensor([0]))
    sub.exit_tokens.fill_(11)  # in place: the kept bound (10, of the whole batch) is not re-read
    assert sub.token_end() == 10
    assert dataclasses.replace(req).token_end() == 10  # a hand-built batch reads its tensors once
    assert pack_requests(SamplingParams(), ExitPolicy(), 5, 2).token_end() == 0


def test_request_batch_and_state_to_device_round_trip():
    samp, exits = _mixed_requests()
    r = pack_requests(samp, exits, vocab_size=32)
    meta = r.to("meta")
    assert all(t.device.type == "meta" for t in meta.tensors())
    back = r.to(torch.device("cpu"))
    for a, b in zip(back.tensors(), r.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    packed_on_meta = pack_requests(samp, exits, vocab_size=32, device="meta")
    assert [(t.shape, t.dtype) for t in packed_on_meta.tensors()] == [(t.shape, t.dtype) for t in r.tensors()]


def test_decode_state_new_index_select_and_clone():
    s = DecodeState.new(5)
    assert s.batch_size == 5
    assert all(t.dtype == torch.int32 and t.shape == (5,) and not t.any() for t in s.tensors())
    for i, t in enumerate(s.tensors()):
        t.copy_(torch.arange(5, dtype=torch.int32) * 10 + i)
    s.finish_reason.copy_(torch.tensor([0, int(Reason.EOS), 0, int(Reason.ERROR), 0], dtype=torch.int32))
    assert s.finished.tolist() == [False, True, False, True, False]
    sub = s.index_select(torch.tensor([4, 0, 2]))
    assert sub.num_generated.tolist() == [40, 0, 20]
    assert sub.finish_reason.tolist() == [0, 0, 0]
    c = s.clone()
    c.phase.fill_(-1)
    assert s.phase.tolist() == [3, 13, 23, 33, 43]  # a clone shares nothing


# ---------------------------------------------------------------------------------------------
# haltkit.decode_step: shapes, dtypes and devices checked once at the call.
# ---------------------------------------------------------------------------------------------

B, V, D = 3, 17, 8


def _inputs():
    req = pack_requests(SamplingParams(temperature=0.8, seed=1), ExitPolicy(cost_of_time=0.1), V, B)
    return torch.randn(B, V), torch.randn(B, D), req, DecodeState.new(B), MarginalValueHead(D, hidden=4)


def _replace_request(field, fn):
    return lambda lg, h, r, s, hd: (lg, h, dataclasses.replace(r, **{field: fn(getattr(r, field))}), s, hd)


def _replace_state(field, fn):
    return lambda lg, h, r, s, hd: (lg, h, r, dataclasses.replace(s, **{field: fn(getattr(s, field))}), hd)


def _replace_weight(field, fn):
    def edit(lg, h, r, s, hd):
        w = hd.weights()
        return lg, h, r, s, w._replace(**{field: fn(getattr(w, field))})
    return edit


BAD_CALLS = [
    # (id, edit of (logits, hidden, requests, state, head), exception, words in the message)
    ("logits-1d", lambda lg, h, r, s, hd: (lg[0], h, r, s, hd), ValueError, ["logits", "[B, V]", "[17]"]),
    ("logits-3d", lambda lg, h, r, s, hd: (lg[None], h, r, s, hd), ValueError, ["logits", "[B, V]", "[1, 3, 17]"]),
    ("logits-numpy", lambda lg, h, r, s, hd: (lg.numpy(), h, r, s, hd), TypeError, ["logits", "torch.Tensor", "ndarray"]),
    ("logits-float64", lambda lg, h, r, s, hd: (lg.double(), h, r, s, hd), ValueError, ["logits", "float32", "float64"]),
    ("logits-int", lambda lg, h, r, s, hd: (lg.long(), h, r, s, hd), ValueError, ["logits", "bfloat16", "int64"]),
    ("logits-no-columns", lambda lg, h, r, s, hd: (lg[:, :0], h, r, s, hd), ValueError, ["logits", "V >= 1"]),
    ("logits-more-rows", lambda lg, h, r, s, hd: (torch.randn(B + 1, V), h, r, s, hd), ValueError,
     ["requests", f"{B} rows", f"logits have {B + 1}"]),
    ("state-fewer-rows", lambda lg, h, r, s, hd: (lg, h, r, DecodeState.new(B - 1), hd), ValueError,
     ["state", f"{B - 1} rows", f"logits have {B}"]),
    ("hidden-without-head", lambda lg, h, r, s, hd: (lg, h, r, s, None), ValueError, ["hidden", "head is None"]),
    ("head-without-hidden", lambda lg, h, r, s, hd: (lg, None, r, s, hd), ValueError, ["hidden", f"[{B}, {D}]"]),
    ("head-wrong-hidden-size", lambda lg, h, r, s, hd: (lg, h, r, s, MarginalValueHead(D + 3)), ValueError,
     ["hidden", f"d_model = {D + 3}", f"[{B}, {D + 3}]", f"[{B}, {D}]"]),
    ("hidden-wrong-rows", lambda lg, h, r, s, hd: (lg, h[:2], r, s, hd), ValueError, ["hidden", f"[{B}, {D}]", f"[2, {D}]"]),
    ("hidden-1d", lambda lg, h, r, s, hd: (lg, h[0], r, s, hd), ValueError, ["hidden", f"[{B}, {D}]", f"[{D}]"]),
    ("hidden-float64", lambda lg, h, r, s, hd: (lg, h.double(), r, s, hd), ValueError, ["hidden", "float64"]),
    ("hidden-other-device", lambda lg, h, r, s, hd: (lg, h.to("meta"), r, s, hd), ValueError, ["hidden", "meta", "cpu"]),
    ("hidden-list", lambda lg, h, r, s, hd: (lg, h.tolist(), r, s, hd), TypeError, ["hidden", "torch.Tensor", "list"]),
    ("head-wrong-type", lambda lg, h, r, s, hd: (lg, h, r, s, "head"), TypeError, ["head", "MarginalValueHead", "str"]),
    ("head-w1-float64", _replace_weight("w1", lambda t: t.double()), ValueError, ["head.w1", "float64"]),
    ("head-b1-other-dtype", _replace_weight("b1", lambda t: t.half()), ValueError, ["head.b1", "float32", "float16"]),
    ("head-w2-wrong-width", _replace_weight("w2", lambda t: t[:3]), ValueError, ["head.w2", "[4]", "[3]"]),
    ("head-w1-other-device", _replace_weight("w1", lambda t: t.to("meta")), ValueError, ["head.w1", "meta"]),
    ("requests-not-packed", lambda lg, h, r, s, hd: (lg, h, vars(r), s, hd), TypeError, ["requests", "pack_requests", "dict"]),
    ("state-not-a-state", lambda lg, h, r, s, hd: (lg, h, r, s.tensors(), hd), TypeError, ["state", "DecodeState", "tuple"]),
    ("top-k-int64", _replace_request("top_k", lambda t: t.long()), ValueError, ["requests.top_k", "int32", "int64"]),
    ("seed-int32", _replace_request("seed", lambda t: t.int()), ValueError, ["requests.seed", "int64", "int32"]),
    ("temperature-float64", _replace_request("temperature", lambda t: t.double()), ValueError,
     ["requests.temperature", "float32", "float64"]),
    ("eos-ids-1d", _replace_request("eos_ids", lambda t: t[:, 0]), ValueError, ["requests.eos_ids", f"[{B}, *]", f"[{B}]"]),
    ("exit-tokens-wrong-rows", _replace_request("exit_tokens", lambda t: t[:2]), ValueError,
     ["requests.exit_tokens", f"[{B}, *]", "[2, 1]"]),
    ("min-p-other-device", _replace_request("min_p", lambda t: t.to("meta")), ValueError, ["requests.min_p", "meta", "cpu"]),
    ("patience-wrong-rows", _replace_request("patience", lambda t: t[:2]), ValueError, ["requests.patience", f"[{B}]", "[2]"]),
    ("requests-packed-for-larger-vocab",
     lambda lg, h, r, s, hd: (lg, h, pack_requests(SamplingParams(), ExitPolicy(exit_tokens=(V + 2,)), V + 5, B), s, hd),
     ValueError, [f"token id {V + 2}", f"V = {V}", f"vocab_size = {V}"]),
    ("hand-built-eos-past-vocab", _replace_request("eos_ids", lambda t: torch.full_like(t, V)), ValueError,
     [f"token id {V}", "eos_ids or exit_tokens"]),
    ("state-phase-int64", _replace_state("phase", lambda t: t.long()), ValueError, ["state.phase", "int32", "int64"]),
    ("state-think-end-wrong-rows", _replace_state("think_end", lambda t: t[:1]), ValueError,
     ["state.think_end", f"[{B}]", "[1]"]),
    ("state-below-count-other-device", _replace_state("below_count", lambda t: t.to("meta")), ValueError,
     ["state.below_count", "meta"]),
    ("state-float", _replace_state("num_generated", lambda t: t.float()), ValueError,
     ["state.num_generated", "int32", "float32"]),
]


@pytest.mark.parametrize("edit, exc, words", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_decode_step_boundary_error_says_what_was_expected(edit, exc, words):
    logits, hidden, req, state, head = _inputs()
    before = [t.clone() for t in state.tensors()]
    logits, hidden, req, state_arg, head = edit(logits, hidden, req, state, head)
    with pytest.raises(exc) as err:
        haltkit.decode_step(logits, hidden, req, state_arg, head)
    msg = str(err.value)
    for w in words:
        assert w in msg, (w, msg)
    # Nothing ran: the (original) state is untouched.
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors()))


def test_decode_step_accepts_every_documented_dtype_combination():
    """Each (logits, hidden/head) dtype gives what float32 gives on the same (rounded) values:
    the same tokens, log-probs and values to the half type's precision."""
    logits, hidden, _, _, _ = _inputs()
    logits = logits * 3  # spread, so that a misread dtype moves tokens
    req = pack_requests([SamplingParams(temperature=0.8, seed=s) for s in range(B - 1)] + [SamplingParams(temperature=0)],
                        ExitPolicy(), V)
    torch.manual_seed(0)
    head32 = MarginalValueHead(D, hidden=4)
    with torch.no_grad():
        head32.b1.normal_()  # values away from zero, so that a relative error shows
    for ldt in (torch.float32, torch.bfloat16, torch.float16):
        for hdt in (torch.float32, torch.bfloat16, torch.float16):
            head = copy.deepcopy(head32).to(hdt)
            lg, h = logits.to(ldt), hidden.to(hdt)
            out = haltkit.decode_step(lg, h, req, DecodeState.new(B), head)
            want = haltkit.decode_step(lg.float(), h.float(), req, DecodeState.new(B), copy.deepcopy(head).float())
            assert out.tokens.shape == (B,) and out.values.dtype == torch.float32
            assert out.tokens.tolist() == want.tokens.tolist(), (ldt, hdt)
            torch.testing.assert_close(out.logprobs, want.logprobs, atol=1e-5, rtol=1e-5)
            tol = 1e-5 if hdt == torch.float32 else 2e-2
            torch.testing.assert_close(out.values, want.values, atol=tol, rtol=tol)


def test_decode_step_backend_errors():
    logits, hidden, req, state, head = _inputs()
    with pytest.raises(ValueError, match="unknown backend 'gpu'.*'torch'"):
        haltkit.decode_step(logits, hidden, req, state, head, backend="gpu")
    with pytest.raises(ValueError, match="'cuda' needs CUDA tensors.*cpu"):
        haltkit.decode_step(logits, hidden, req, state, head, backend="cuda")
    with pytest.raises(TypeError, match="unexpected keyword argument 'temperature'"):
        haltkit.decode_step(logits, hidden, req, state, head, temperature=0.5)  # type: ignore[call-arg]
    avail = haltkit.backends()
    assert set(avail) == {"torch", "triton", "cpu", "cuda"} and avail["torch"] == "available"
    for name, why in avail.items():
        # Available, or a reason that says something (not an empty or a placeholder string).
        assert why == "available" or (isinstance(why, str) and len(why.strip()) > 8), (name, why)
        if why != "available" and name in ("cpu", "triton"):
            with pytest.raises(RuntimeError) as err:
                haltkit.decode_step(logits, hidden, req, state, head, backend=name)
            assert name in str(err.value) and why in str(err.value)
        if why == "available" and name != "cuda":  # cuda needs CUDA tensors (checked above)
            out = haltkit.decode_step(logits, hidden, req, DecodeState.new(B), head, backend=name)
            ref = haltkit.decode_step(logits, hidden, req, DecodeState.new(B), head, backend="torch")
            assert out.tokens.tolist() == ref.tokens.tolist(), name

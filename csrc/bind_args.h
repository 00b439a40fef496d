// From the flat tuples of ints haltkit/native.py passes (data pointers, shapes, strides, dtype
// codes) to the launchers' argument structs. Shared by both bindings; host code only.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "haltkit/decode_step.cuh"
#include "haltkit/exit_rules.cuh"
#include "haltkit/verify_step.cuh"

namespace hk {

using Ints = std::vector<int64_t>;

inline void expect_len(const char* what, const Ints& v, size_t n) {
  if (v.size() != n)
    throw std::invalid_argument(std::string("haltkit native op: ") + what + " needs " + std::to_string(n) +
                                " entries, got " + std::to_string(v.size()));
}

template <class T>
T* ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

// logits:   (ptr, row stride, dtype, B, V)
// hidden:   (ptr, row stride, dtype, d), ptr 0 without a head
// head:     (w1, b1, w2, b2, R, dtype, is_mlp)
// requests: the 13 RequestBatch fields in declaration order, then E and X
// state:    the 7 DecodeState fields in declaration order
// outputs:  tokens, logprobs, values, active_idx, num_active
inline DecodeStepArgs decode_step_args(const Ints& logits, const Ints& hidden, const Ints& head,
                                       const Ints& req, const Ints& st, const Ints& out) {
  expect_len("logits", logits, 5);
  expect_len("hidden", hidden, 4);
  expect_len("head", head, 7);
  expect_len("requests", req, 15);
  expect_len("state", st, 7);
  expect_len("outputs", out, 5);
  DecodeStepArgs a{};
  a.logits = ptr<const void>(logits[0]);
  a.logits_stride = logits[1];
  a.logits_dtype = static_cast<int32_t>(logits[2]);
  a.B = logits[3];
  a.V = logits[4];
  a.hidden = ptr<const void>(hidden[0]);
  a.hidden_stride = hidden[1];
  a.hidden_dtype = static_cast<int32_t>(hidden[2]);
  a.d = hidden[3];
  a.w1 = ptr<const void>(head[0]);
  a.b1 = ptr<const void>(head[1]);
  a.w2 = ptr<const void>(head[2]);
  a.b2 = ptr<const void>(head[3]);
  a.R = head[4];
  a.weight_dtype = static_cast<int32_t>(head[5]);
  a.mlp = head[6] != 0;
  a.temperature = ptr<const float>(req[0]);
  a.top_k = ptr<const int32_t>(req[1]);
  a.top_p = ptr<const float>(req[2]);
  a.min_p = ptr<const float>(req[3]);
  a.seed = ptr<const int64_t>(req[4]);
  a.cost_of_time = ptr<const float>(req[5]);
  a.patience = ptr<const int32_t>(req[6]);
  a.min_new_tokens = ptr<const int32_t>(req[7]);
  a.max_new_tokens = ptr<const int32_t>(req[8]);
  a.thinking_budget = ptr<const int32_t>(req[9]);
  a.eos_ids = ptr<const int32_t>(req[10]);
  a.exit_tokens = ptr<const int32_t>(req[11]);
  a.exit_len = ptr<const int32_t>(req[12]);
  a.E = req[13];
  a.X = req[14];
  a.num_generated = ptr<int32_t>(st[0]);
  a.think_tokens = ptr<int32_t>(st[1]);
  a.below_count = ptr<int32_t>(st[2]);
  a.phase = ptr<int32_t>(st[3]);
  a.forced_pos = ptr<int32_t>(st[4]);
  a.think_end = ptr<int32_t>(st[5]);
  a.finish_reason = ptr<int32_t>(st[6]);
  a.tokens = ptr<int64_t>(out[0]);
  a.logprobs = ptr<float>(out[1]);
  a.values = ptr<float>(out[2]);
  a.active_idx = ptr<int64_t>(out[3]);
  a.num_active = ptr<int64_t>(out[4]);
  if (a.B < 1 || a.V < 1 || a.V > INT32_MAX)
    throw std::invalid_argument("decode_step: need B >= 1 and 1 <= V < 2^31, got B=" +
                                std::to_string(a.B) + " V=" + std::to_string(a.V));
  if (a.E < 1 || a.X < 1) throw std::invalid_argument("decode_step: eos_ids and exit_tokens need >= 1 column");
  if (a.hidden != nullptr && (a.d < 1 || a.R < 1))
    throw std::invalid_argument("decode_step: a head needs d >= 1 and R >= 1");
  return a;
}

// logits:   (ptr, row stride, position stride, dtype, B, K + 1, V)
// hidden:   (ptr, row stride, position stride, dtype, d), ptr 0 without a head
// head, requests, state: as decode_step_args
// drafts:   (draft_tokens, draft_lens, draft_probs or 0, probs dtype, probs dims 0 / 2 / 3, rejection)
// outputs:  tokens, num_emitted, num_accepted, values, logprobs, active_idx, num_active
inline VerifyStepArgs verify_step_args(const Ints& logits, const Ints& hidden, const Ints& head, const Ints& req,
                                       const Ints& st, const Ints& drafts, const Ints& out) {
  expect_len("logits", logits, 7);
  expect_len("hidden", hidden, 5);
  expect_len("drafts", drafts, 6);
  expect_len("outputs", out, 7);
  VerifyStepArgs v{};
  v.step = decode_step_args({logits[0], logits[1], logits[3], logits[4], logits[6]},
                            {hidden[0], hidden[1], hidden[3], hidden[4]}, head, req, st,
                            {out[0], out[4], out[3], out[5], out[6]});
  v.K1 = logits[5];
  v.logits_pos_stride = logits[2];
  v.hidden_pos_stride = hidden[2];
  v.draft_tokens = ptr<const int64_t>(drafts[0]);
  v.draft_lens = ptr<const int32_t>(drafts[1]);
  v.draft_probs = ptr<const void>(drafts[2]);
  v.probs_dtype = static_cast<int32_t>(drafts[3]);
  v.probs_dims = static_cast<int32_t>(drafts[4]);
  v.rejection = drafts[5] != 0;
  v.num_emitted = ptr<int32_t>(out[1]);
  v.num_accepted = ptr<int32_t>(out[2]);
  if (v.K1 < 1) throw std::invalid_argument("verify_step: need K + 1 >= 1 positions");
  // Rejection reads q at drafted positions only, so with K = 0 there is nothing to read.
  const bool probs_ok = (v.probs_dims == 2 || v.probs_dims == 3) && v.draft_probs != nullptr;
  if (v.rejection && v.K1 > 1 && !probs_ok)
    throw std::invalid_argument("verify_step: method rejection needs draft_probs of 2 or 3 dimensions");
  return v;
}

// logits, hidden, head, requests, state: as decode_step_args (logits float32, written)
// rules:    (plan, token, halt_token, active)
inline ExitRulesArgs exit_rules_args(const Ints& logits, const Ints& hidden, const Ints& head, const Ints& req,
                                     const Ints& st, const Ints& rules) {
  expect_len("rules", rules, 4);
  ExitRulesArgs x{};
  x.step = decode_step_args(logits, hidden, head, req, st, {0, 0, 0, 0, 0});
  if (x.step.logits_dtype != kFloat32) throw std::invalid_argument("exit_rules: logits must be float32");
  x.logits = ptr<float>(logits[0]);
  x.plan = ptr<int32_t>(rules[0]);
  x.token = ptr<const int64_t>(rules[1]);
  x.halt_token = ptr<const int64_t>(rules[2]);
  x.active = ptr<const uint8_t>(rules[3]);
  return x;
}

}  // namespace hk

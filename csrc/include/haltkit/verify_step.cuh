// verify_step: speculative verification judged position by position as decode_step (see
// python/haltkit/reference/verify_step.py). The arguments as raw pointers, the draft checks, and
// the two launchers.
#pragma once

#include "decode_step.cuh"

namespace hk {

// A DecodeStepArgs whose logits / hidden pointers are those of position 0 (logits_stride and
// hidden_stride step between rows b), whose tokens / logprobs / values are [B, K1], plus the drafts.
struct VerifyStepArgs {
  DecodeStepArgs step;
  int64_t K1;                  // K + 1 positions
  int64_t logits_pos_stride;   // elements from position j to j + 1
  int64_t hidden_pos_stride;
  const int64_t* draft_tokens;  // [B, K]
  const int32_t* draft_lens;    // [B]
  const void* draft_probs;      // null (method "exact"), [B, K] ones, or [B, K, V]
  int32_t probs_dtype;
  int32_t probs_dims;           // 0, 2 or 3
  bool rejection;
  int32_t* num_emitted;   // [B]
  int32_t* num_accepted;  // [B]
};

// q(x) of the drafted token at position j of row b (1 for the point-mass form).
HK_HD float draft_q(const VerifyStepArgs& v, int64_t b, int64_t j) {
  const int64_t K = v.K1 - 1;
  if (v.probs_dims == 2) return load_as_float(v.draft_probs, b * K + j, v.probs_dtype);
  return load_as_float(v.draft_probs, (b * K + j) * v.step.V + v.draft_tokens[b * K + j], v.probs_dtype);
}

// A running row whose draft length is outside [0, K], whose drafted token at a judged position is
// outside [0, V), or (rejection, temperature > 0) whose q(x) there is not a finite number > 0
// (point-mass form: not exactly 1): judged as if its logits at position 0 were bad.
HK_HD bool malformed_draft(const VerifyStepArgs& v, int64_t b, const RowRequest& r) {
  const int64_t K = v.K1 - 1;
  const int32_t len = v.draft_lens[b];
  if (len < 0 || len > K) return true;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t x = v.draft_tokens[b * K + j];
    if (x < 0 || x >= v.step.V) return true;
  }
  if (!v.rejection || !(r.temperature > 0.0f)) return false;
  for (int64_t j = 0; j < len; ++j) {
    const float q = draft_q(v, b, j);
    if (v.probs_dims == 2 ? q != 1.0f : !(q > 0.0f && q < kInf)) return true;
  }
  return false;
}

// Host launcher (rows over `num_threads` threads) and CUDA launcher (on `stream`), as decode_step's.
void verify_step_cpu(const VerifyStepArgs& args, int num_threads);
void verify_step_cuda(const VerifyStepArgs& args, int device, void* stream);

}  // namespace hk

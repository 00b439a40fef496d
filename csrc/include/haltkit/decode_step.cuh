// decode_step: the arguments of one fused step as raw pointers, and the two launchers that
// run it (host threads across rows; CUDA blocks across rows). No torch types, so a binding
// change never touches the kernels.
#pragma once

#include "philox.cuh"
#include "sampling.cuh"
#include "shim.cuh"
#include "termination.cuh"

namespace hk {

// One slice of a greedy row scanned by its own CUDA block (rows split across blocks when B is
// small): the slice's max (NaN counted as +inf), the first index reaching it, and the softmax
// mass of the slice relative to its max.
struct GreedyPart {
  float max;
  int32_t arg;
  double mass;
};

// Every tensor of haltkit.ops' decode_step op. All [B] tensors are contiguous; logits and hidden
// rows have unit column stride; head weights are contiguous.
struct DecodeStepArgs {
  int64_t B, V;
  const void* logits;  // [B, V], row stride logits_stride, dtype logits_dtype
  int64_t logits_stride;
  int32_t logits_dtype;
  const void* hidden;  // [B, d] or null when there is no head
  int64_t hidden_stride, d;
  int32_t hidden_dtype;
  const void* w1;  // [R, d + 2]
  const void* b1;  // [R]
  const void* w2;  // [R] for the MLP head, unused for the linear one
  const void* b2;  // [1]
  int64_t R;
  int32_t weight_dtype;
  bool mlp;
  // haltkit.RequestBatch, field by field.
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const float* min_p;
  const int64_t* seed;
  const float* cost_of_time;
  const int32_t *patience, *min_new_tokens, *max_new_tokens, *thinking_budget;
  const int32_t* eos_ids;      // [B, E]
  const int32_t* exit_tokens;  // [B, X]
  const int32_t* exit_len;
  int64_t E, X;
  // haltkit.DecodeState, updated in place.
  int32_t *num_generated, *think_tokens, *below_count, *phase, *forced_pos, *think_end, *finish_reason;
  // haltkit.StepOutput.
  int64_t* tokens;
  float* logprobs;
  float* values;
  int64_t* active_idx;
  int64_t* num_active;
  // CUDA only: num_parts > 1 splits each running greedy row over that many blocks, whose
  // results land in parts[b * num_parts + s] (a workspace) before the rows are judged.
  GreedyPart* parts;
  int64_t num_parts;
};

HK_HD RowRequest load_request(const DecodeStepArgs& a, int64_t b) {
  RowRequest r;
  r.temperature = a.temperature[b];
  r.top_p = a.top_p[b];
  r.min_p = a.min_p[b];
  r.cost_of_time = a.cost_of_time[b];
  r.top_k = a.top_k[b];
  r.patience = a.patience[b];
  r.min_new_tokens = a.min_new_tokens[b];
  r.max_new_tokens = a.max_new_tokens[b];
  r.thinking_budget = a.thinking_budget[b];
  r.exit_len = a.exit_len[b];
  r.seed = static_cast<uint64_t>(a.seed[b]);
  r.eos_ids = a.eos_ids + b * a.E;
  r.exit_tokens = a.exit_tokens + b * a.X;
  r.num_eos = static_cast<int32_t>(a.E);
  r.num_exit = static_cast<int32_t>(a.X);
  return r;
}

HK_HD RowState load_state(const DecodeStepArgs& a, int64_t b) {
  return RowState{a.num_generated[b], a.think_tokens[b], a.below_count[b], a.phase[b],
                  a.forced_pos[b],    a.think_end[b],    a.finish_reason[b]};
}

HK_HD void store_state(const DecodeStepArgs& a, int64_t b, const RowState& s) {
  a.num_generated[b] = s.num_generated;
  a.think_tokens[b] = s.think_tokens;
  a.below_count[b] = s.below_count;
  a.phase[b] = s.phase;
  a.forced_pos[b] = s.forced_pos;
  a.think_end[b] = s.think_end;
  a.finish_reason[b] = s.finish_reason;
}

// What verify_step adds to a position: speculative sampling of its drafted token.
struct SpecDraft {
  bool on;         // method "rejection", a drafted position of a sampled row
  int64_t draft;   // the drafted token, in [0, V)
  const void* q;   // the draft distribution row [V], or null for a point mass at the draft
  int32_t q_dtype;
};

// One position to judge: its logits row, its hidden row (null without a head), and whether a
// malformed draft makes it an ERROR whatever the logits.
struct Position {
  const void* logits;
  const void* hidden;
  bool force_bad;
  SpecDraft spec;
  const GreedyPart* parts;  // CUDA: this row's slices, already scanned (null: scan it here)
  int64_t num_parts;
};

struct Judged {
  int64_t token;  // -1 when nothing is emitted
  float logprob;  // NaN when nothing is emitted
  float value;    // NaN for rows not running or without a head
};

// The head is  sum_r unit(r, pre_r) + bias,  with pre_r = <x, w1[r]> (x = [h, step features]):
// the linear head has one unit, pre_0 + b1[0], and no bias; the MLP's unit r is
// relu(pre_r + b1[r]) * w2[r] and its bias b2[0]. Each launcher sums the units its own way.
HK_HD float head_unit(const DecodeStepArgs& a, int64_t r, float pre) {
  const float h = pre + load_as_float(a.b1, r, a.weight_dtype);
  if (!a.mlp) return h;
  return (h < 0.0f ? 0.0f : h) * load_as_float(a.w2, r, a.weight_dtype);  // NaN passes, as torch.relu
}
HK_HD float head_bias(const DecodeStepArgs& a) {
  return a.mlp ? load_as_float(a.b2, 0, a.weight_dtype) : 0.0f;
}

// Host launcher: rows spread over `num_threads` threads. Throws std::invalid_argument on
// arguments the Python layer should have rejected.
void decode_step_cpu(const DecodeStepArgs& args, int num_threads);

// CUDA launcher on `stream` (a cudaStream_t of `device`, the tensors' device, made current for
// the launch). Throws std::runtime_error when no device is usable.
void decode_step_cuda(const DecodeStepArgs& args, int device, void* stream);

// Throws std::runtime_error saying why the CUDA kernels cannot run on `device` (no device, a
// driver older than the build's CUDA, no code for the GPU's arch); returns when they can.
void probe_cuda(int device);

}  // namespace hk

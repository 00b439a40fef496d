// exit_rules: decode_step's exit and phase rules for a step whose token another sampler draws
// (vLLM's). The step is split around that draw, and one call does the half after the previous
// draw and the half before the next one:
//   1. commit: a row with a pending plan and the token drawn for it (token >= 0) takes step 5
//      of the specification (finish_step) with that token;
//   2. plan: the head's value (only where the rules consult it) and steps 1 and 3 (plan_step,
//      without a logits check: the logits are the other sampler's business), kept for step 1
//      of the next call;
//   3. force: the row's logits become -inf but for one 0 at the token it must take: its forced
//      exit token, or its halt token when it emits nothing of its own this step (a value or
//      budget exit without exit tokens, an error, or a row already finished).
// The reference is haltkit/vllm/rules.py (exit_rules); the launchers run the row code here.
#pragma once

#include "decode_step.cuh"

namespace hk {

struct ExitRulesArgs {
  // logits ([B, V] float32, masked in place), hidden, head, requests and state; no outputs.
  DecodeStepArgs step;
  float* logits;              // step.logits, writable
  int32_t* plan;              // [B, kPlanWords]: read by commit, written by plan
  const int64_t* token;       // [B]: the token drawn for the row's pending plan, -1 for none
  const int64_t* halt_token;  // [B]: what a row that emits nothing is made to take, -1 for none
  const uint8_t* active;      // [B]: rows haltkit governs; the others are not touched
};

// Whether plan_step reads the row's value (the head need not run for the others).
HK_HD bool wants_value(const RowRequest& r, const RowState& s) {
  return s.finish_reason == kNone && s.phase == 0 && r.cost_of_time > -kInf;
}

// Step 1 of the call: the pending plan, committed with the token drawn for it.
HK_HD void commit_row(const ExitRulesArgs& x, int64_t b, const RowRequest& r, RowState& s) {
  const int64_t token = x.token[b];
  if (token >= 0) finish_step(r, s, load_plan(x.plan + b * kPlanWords), token);
}

// The token step 3 forces on a row with plan `p` (-1: the sampler draws freely).
HK_HD int64_t forced_by(const ExitRulesArgs& x, int64_t b, const StepPlan& p) {
  if (p.forcing) return p.forced_token;
  return p.emit ? -1 : x.halt_token[b];
}

// Host launcher: rows spread over `num_threads` threads.
void exit_rules_cpu(const ExitRulesArgs& args, int num_threads);

// CUDA launcher on `stream` of `device` (see decode_step_cuda).
void exit_rules_cuda(const ExitRulesArgs& args, int device, void* stream);

}  // namespace hk

// The per-row termination and phase state machine of a decode step (steps 1, 3, 5 of the
// specification in python/haltkit/reference/decode_step.py), as scalar code run once per row.
#pragma once

#include "shim.cuh"

namespace hk {

// haltkit.Reason
enum Reason : int32_t { kNone = 0, kEos = 1, kLength = 2, kValue = 3, kBudget = 4, kError = 5, kModel = 6 };

// One request's parameters (a row of haltkit.RequestBatch); token lists stay in global memory.
struct RowRequest {
  float temperature, top_p, min_p, cost_of_time;
  int32_t top_k, patience, min_new_tokens, max_new_tokens, thinking_budget, exit_len;
  uint64_t seed;
  const int32_t* eos_ids;      // [E], padded with -1
  const int32_t* exit_tokens;  // [X], padded with -1
  int32_t num_eos, num_exit;   // E, X
};

// One row of haltkit.DecodeState.
struct RowState {
  int32_t num_generated, think_tokens, below_count, phase, forced_pos, think_end, finish_reason;
};

// What a step does to a row, decided before any token is chosen.
struct StepPlan {
  bool running;    // finish_reason was NONE at the start of the step
  bool bad;        // finishes with ERROR now
  bool emit;       // emits a token this step
  bool forcing;    // the token is the forced exit token `forced_token`
  bool draw;       // the token is drawn from the logits
  bool stop_now;   // thinking ended without exit tokens: finishes with `think_reason`
  bool switched;   // thinking ended with exit tokens: answer phase starts now
  bool think_exit;
  int32_t think_reason;  // kValue or kBudget when think_exit
  int32_t below_count;   // the new below-price count
  int32_t forced_pos;    // the exit-token index forced this step (when forcing)
  int32_t forced_token;
};

// A StepPlan kept between the two halves of a step whose token another sampler draws (see
// exit_rules.cuh): kPlanWords int32 per row, the layout of haltkit/vllm/rules.py's plan tensor.
constexpr int kPlanWords = 5;
enum PlanWord : int { kPlanFlags = 0, kPlanThinkReason = 1, kPlanBelowCount = 2, kPlanForcedPos = 3, kPlanForcedToken = 4 };
enum PlanFlag : int32_t {
  kFlagRunning = 1, kFlagBad = 2, kFlagEmit = 4, kFlagForcing = 8, kFlagDraw = 16,
  kFlagStopNow = 32, kFlagSwitched = 64, kFlagThinkExit = 128,
};

HK_HD void store_plan(const StepPlan& p, int32_t* w) {
  w[kPlanFlags] = (p.running ? kFlagRunning : 0) | (p.bad ? kFlagBad : 0) | (p.emit ? kFlagEmit : 0) |
                  (p.forcing ? kFlagForcing : 0) | (p.draw ? kFlagDraw : 0) | (p.stop_now ? kFlagStopNow : 0) |
                  (p.switched ? kFlagSwitched : 0) | (p.think_exit ? kFlagThinkExit : 0);
  w[kPlanThinkReason] = p.think_reason;
  w[kPlanBelowCount] = p.below_count;
  w[kPlanForcedPos] = p.forced_pos;
  w[kPlanForcedToken] = p.forcing ? p.forced_token : -1;
}

HK_HD StepPlan load_plan(const int32_t* w) {
  StepPlan p{};
  const int32_t f = w[kPlanFlags];
  p.running = f & kFlagRunning;
  p.bad = f & kFlagBad;
  p.emit = f & kFlagEmit;
  p.forcing = f & kFlagForcing;
  p.draw = f & kFlagDraw;
  p.stop_now = f & kFlagStopNow;
  p.switched = f & kFlagSwitched;
  p.think_exit = f & kFlagThinkExit;
  p.think_reason = w[kPlanThinkReason];
  p.below_count = w[kPlanBelowCount];
  p.forced_pos = w[kPlanForcedPos];
  p.forced_token = w[kPlanForcedToken];
  return p;
}

// The head's `budget`: thinking budget, else max_new_tokens (>= 1 after validation).
HK_HD int32_t feature_budget(const RowRequest& r) {
  return r.thinking_budget > 0 ? r.thinking_budget : r.max_new_tokens;
}

// Steps 1 and 3: row check, value exits with patience, thinking budget, forced exit tokens.
// `logits_bad` is the row check of the logits (NaN or +inf anywhere, or no finite entry).
HK_HD StepPlan plan_step(const RowRequest& r, const RowState& s, bool logits_bad, float value) {
  StepPlan p{};
  p.running = s.finish_reason == kNone;
  p.bad = p.running && logits_bad;
  bool consult = p.running && !p.bad && s.phase == 0;
  const bool lam_on = r.cost_of_time > -kInf;
  const bool value_finite = (float_bits(value) & 0x7f800000u) != 0x7f800000u;
  if (consult && lam_on && !value_finite) p.bad = true;
  consult = consult && !p.bad;
  const bool below = consult && s.num_generated >= r.min_new_tokens && value < r.cost_of_time;
  p.below_count = consult ? (below ? s.below_count + 1 : 0) : s.below_count;
  const bool value_exit = consult && p.below_count >= r.patience;
  const bool budget_exit = consult && !value_exit && r.thinking_budget > 0 &&
                           s.think_tokens >= r.thinking_budget;
  p.think_exit = value_exit || budget_exit;
  p.think_reason = value_exit ? kValue : kBudget;
  const bool has_exit = r.exit_len > 0;
  p.switched = p.think_exit && has_exit;
  p.stop_now = p.think_exit && !has_exit;
  p.forced_pos = p.switched ? 0 : s.forced_pos;
  p.emit = p.running && !p.bad && !p.stop_now;
  p.forcing = p.emit && (p.switched || (s.phase == 1 && p.forced_pos < r.exit_len));
  p.draw = p.emit && !p.forcing;
  if (p.forcing) {
    const int32_t i = p.forced_pos < r.num_exit - 1 ? p.forced_pos : r.num_exit - 1;
    p.forced_token = r.exit_tokens[i < 0 ? 0 : i];
  }
  return p;
}

HK_HD bool is_eos(const RowRequest& r, int64_t token) {
  for (int32_t i = 0; i < r.num_eos; ++i)
    if (r.eos_ids[i] == token) return true;
  return false;
}

// Step 5: the state update once the row's token (if it emits one) is known.
HK_HD void finish_step(const RowRequest& r, RowState& s, const StepPlan& p, int64_t token) {
  const bool closes = p.draw && s.phase == 0 && r.exit_len > 0 && token == r.exit_tokens[0];
  const bool thinking_token = p.emit && s.phase == 0 && !p.switched && !closes;
  const int32_t n_new = s.num_generated + (p.emit ? 1 : 0);
  int32_t finish = s.finish_reason;
  if (p.bad) {
    finish = kError;
  } else if (p.stop_now) {
    finish = p.think_reason;
  } else if (p.emit && is_eos(r, token)) {
    finish = kEos;
  } else if (p.emit && n_new >= r.max_new_tokens) {
    finish = kLength;
  }
  if (p.think_exit) {
    s.think_end = p.think_reason;
  } else if (closes) {
    s.think_end = kModel;
  }
  if (p.forcing) {
    s.forced_pos = p.forced_pos + 1;
  } else if (closes) {
    s.forced_pos = r.exit_len;
  }
  if (p.switched || closes) s.phase = 1;
  s.below_count = p.below_count;
  s.think_tokens += thinking_token ? 1 : 0;
  s.num_generated = n_new;
  s.finish_reason = finish;
}

}  // namespace hk

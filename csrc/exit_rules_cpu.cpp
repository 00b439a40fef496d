// exit_rules on the host (see haltkit/exit_rules.cuh): commits serially (a few integer ops a
// row), the head over the rows that consult it in blocks of kHeadRows, then plans and forced
// logits rows in parallel.
#include <omp.h>

#include "cpu_rows.h"
#include "haltkit/exit_rules.cuh"

namespace hk {

void exit_rules_cpu(const ExitRulesArgs& x, int num_threads) {
  const DecodeStepArgs& a = x.step;
  if (a.B < 1 || a.V < 1) throw std::invalid_argument("exit_rules: B and V must be >= 1");
  if (a.logits_dtype != kFloat32) throw std::invalid_argument("exit_rules: logits must be float32");

  std::vector<int64_t> consult;  // rows whose plan reads the head's value
  for (int64_t b = 0; b < a.B; ++b) {
    if (!x.active[b]) continue;
    const RowRequest r = load_request(a, b);
    RowState s = load_state(a, b);
    commit_row(x, b, r, s);
    store_state(a, b, s);
    if (a.hidden != nullptr && wants_value(r, s)) consult.push_back(b);
  }

  std::vector<float> values(static_cast<size_t>(a.B), kNaN);
  const int64_t n = static_cast<int64_t>(consult.size());
  for_each_row((n + kHeadRows - 1) / kHeadRows, num_threads, [&](int64_t blk) {
    const int64_t first = blk * kHeadRows;
    head_block(a, consult.data() + first, static_cast<int>(std::min<int64_t>(kHeadRows, n - first)), values.data());
  });

  for_each_row(a.B, num_threads, [&](int64_t b) {
    if (!x.active[b]) return;
    const StepPlan p = plan_step(load_request(a, b), load_state(a, b), /*logits_bad=*/false, values[b]);
    store_plan(p, x.plan + b * kPlanWords);
    const int64_t force = forced_by(x, b, p);
    if (force < 0 || force >= a.V) return;  // the Python layer keeps every forced token below V
    float* row = x.logits + b * a.logits_stride;
#pragma omp simd
    for (int64_t i = 0; i < a.V; ++i) row[i] = i == force ? 0.0f : -kInf;
  });
}

}  // namespace hk

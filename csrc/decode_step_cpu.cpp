// decode_step on the host: every row judged once by the shared row machinery (cpu_rows.h), one
// row per OpenMP task, then compaction.
#include <omp.h>

#include "cpu_rows.h"

namespace hk {

void decode_step_cpu(const DecodeStepArgs& a, int num_threads) {
  if (a.B < 1 || a.V < 1) throw std::invalid_argument("decode_step: B and V must be >= 1");
  const JudgeFn judge_row = judge_for(a.logits_dtype);
  const int64_t lsize = a.logits_dtype == kFloat32 ? 4 : 2, hsize = a.hidden_dtype == kFloat32 ? 4 : 2;
  for_each_row(a.B, num_threads, [&](int64_t b) {
    const RowRequest r = load_request(a, b);
    RowState s = load_state(a, b);
    Position pos{};
    pos.logits = static_cast<const char*>(a.logits) + b * a.logits_stride * lsize;
    pos.hidden = a.hidden == nullptr ? nullptr : static_cast<const char*>(a.hidden) + b * a.hidden_stride * hsize;
    const Judged j = judge_row(a, r, s, pos);
    store_state(a, b, s);
    a.tokens[b] = j.token;
    a.logprobs[b] = j.logprob;
    a.values[b] = j.value;
  });
  compact_host(a.finish_reason, a.B, a.active_idx, a.num_active);
}

}  // namespace hk

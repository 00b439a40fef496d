// decode_step on the host: every row judged once by the shared row machinery (cpu_rows.h), one
// row per OpenMP task, then compaction.
#include <omp.h>

#include "cpu_rows.h"

namespace hk {

void decode_step_cpu(const DecodeStepArgs& a, int num_threads) {
  if (a.B < 1 || a.V < 1) throw std::invalid_argument("decode_step: B and V must be >= 1");
  const JudgeFn judge_row = judge_for(a.logits_dtype);
  const int64_t lsize = a.logits_dtype == kFloat32 ? 4 : 2, hsize = a.hidden_dtype == kFloat32 ? 4 : 2;
  // The head first, a block of rows per task, so its weights are read once per block.
  std::vector<float> values(static_cast<size_t>(a.B), kNaN);
  if (a.hidden != nullptr) {
    const int64_t blocks = (a.B + kHeadRows - 1) / kHeadRows;
    for_each_row(blocks, num_threads, [&](int64_t blk) {
      const void* rows[kHeadRows];
      int32_t n[kHeadRows], budget[kHeadRows];
      const int count = static_cast<int>(std::min<int64_t>(kHeadRows, a.B - blk * kHeadRows));
      for (int i = 0; i < count; ++i) {
        const int64_t b = blk * kHeadRows + i;
        rows[i] = static_cast<const char*>(a.hidden) + b * a.hidden_stride * hsize;
        n[i] = a.num_generated[b];
        budget[i] = feature_budget(load_request(a, b));
      }
      head_values(a, rows, n, budget, count, values.data() + blk * kHeadRows, scratch());
    });
  }
  for_each_row(a.B, num_threads, [&](int64_t b) {
    const RowRequest r = load_request(a, b);
    RowState s = load_state(a, b);
    Position pos{};
    pos.logits = static_cast<const char*>(a.logits) + b * a.logits_stride * lsize;
    const Judged j = judge_row(a, r, s, pos, values[b]);
    store_state(a, b, s);
    a.tokens[b] = j.token;
    a.logprobs[b] = j.logprob;
    a.values[b] = j.value;
  });
  compact_host(a.finish_reason, a.B, a.active_idx, a.num_active);
}

}  // namespace hk

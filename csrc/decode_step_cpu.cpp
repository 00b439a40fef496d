// decode_step on the host: the value head and the greedy rows' logits scans in one parallel pass,
// then every row judged once by the shared row machinery (cpu_rows.h), one row per OpenMP task,
// then compaction.
#include <omp.h>

#include "cpu_rows.h"

namespace hk {

void decode_step_cpu(const DecodeStepArgs& a, int num_threads) {
  if (a.B < 1 || a.V < 1) throw std::invalid_argument("decode_step: B and V must be >= 1");
  const JudgeFn judge_row = judge_for(a.logits_dtype);
  const GreedyScanFn scan_row_greedy = greedy_scan_for(a.logits_dtype);
  const int64_t lsize = a.logits_dtype == kFloat32 ? 4 : 2;
  auto logits_row = [&](int64_t b) { return static_cast<const char*>(a.logits) + b * a.logits_stride * lsize; };

  // First pass: the head, a block of rows per task so its weights are read once per block, and
  // the logits scans of greedy rows (the scan does not need the value; the decision does). The
  // two kinds of task alternate, so one thread's head FMAs run while another streams logits:
  // the head is compute-bound and the scan memory-bound.
  std::vector<float> values(static_cast<size_t>(a.B), kNaN);
  std::vector<GreedyScan> scans(static_cast<size_t>(a.B));
  std::vector<char> scanned(static_cast<size_t>(a.B), 0);
  const int64_t blocks = a.hidden != nullptr ? (a.B + kHeadRows - 1) / kHeadRows : 0;
  std::vector<int64_t> tasks;  // >= 0: scan row b; < 0: head block -1 - task
  tasks.reserve(static_cast<size_t>(blocks + a.B));
  for (int64_t b = 0, blk = 0; b < a.B || blk < blocks;) {
    if (blk < blocks) tasks.push_back(-1 - blk++);
    for (int k = 0; k < kHeadRows && b < a.B; ++k, ++b)
      if (a.finish_reason[b] == kNone && a.temperature[b] == 0.0f) tasks.push_back(b);
  }
  for_each_row(static_cast<int64_t>(tasks.size()), num_threads, [&](int64_t t) {
    const int64_t task = tasks[static_cast<size_t>(t)];
    if (task >= 0) {
      scans[task] = scan_row_greedy(logits_row(task), a.V);
      scanned[task] = 1;
      return;
    }
    const int64_t first = (-1 - task) * kHeadRows;
    const int count = static_cast<int>(std::min<int64_t>(kHeadRows, a.B - first));
    int64_t rows[kHeadRows];
    for (int i = 0; i < count; ++i) rows[i] = first + i;
    head_block(a, rows, count, values.data());
  });
  for_each_row(a.B, num_threads, [&](int64_t b) {
    const RowRequest r = load_request(a, b);
    RowState s = load_state(a, b);
    Position pos{};
    pos.logits = logits_row(b);
    const Judged j = judge_row(a, r, s, pos, values[b], scanned[b] ? &scans[b] : nullptr);
    store_state(a, b, s);
    a.tokens[b] = j.token;
    a.logprobs[b] = j.logprob;
    a.values[b] = j.value;
  });
  compact_host(a.finish_reason, a.B, a.active_idx, a.num_active);
}

}  // namespace hk

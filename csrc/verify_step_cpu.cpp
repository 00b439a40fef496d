// verify_step on the host: each row's positions judged in order by the shared row machinery
// (cpu_rows.h) until the run stops, one row per OpenMP task, then compaction.
#include <omp.h>

#include "cpu_rows.h"
#include "haltkit/verify_step.cuh"

namespace hk {

void verify_step_cpu(const VerifyStepArgs& v, int num_threads) {
  const DecodeStepArgs& a = v.step;
  if (a.B < 1 || a.V < 1 || v.K1 < 1) throw std::invalid_argument("verify_step: B, K + 1 and V must be >= 1");
  const JudgeFn judge_row = judge_for(a.logits_dtype);
  const int64_t lsize = a.logits_dtype == kFloat32 ? 4 : 2, hsize = a.hidden_dtype == kFloat32 ? 4 : 2;
  const int64_t K = v.K1 - 1;
  for_each_row(a.B, num_threads, [&](int64_t b) {
    const RowRequest r = load_request(a, b);
    RowState s = load_state(a, b);
    const bool malformed = s.finish_reason == kNone && malformed_draft(v, b, r);
    const int32_t len = v.draft_lens[b];
    int32_t emitted = 0, accepted = 0;
    bool in_run = s.finish_reason == kNone;
    // Position j, if judged, comes after j emitted tokens: its head value can be computed first,
    // all positions in one pass over the head's weights.
    std::vector<float> values(static_cast<size_t>(v.K1), kNaN);
    if (in_run && a.hidden != nullptr) {
      std::vector<const void*> rows(static_cast<size_t>(v.K1));
      std::vector<int32_t> n(static_cast<size_t>(v.K1)), budget(static_cast<size_t>(v.K1), feature_budget(r));
      for (int64_t j = 0; j < v.K1; ++j) {
        rows[j] = static_cast<const char*>(a.hidden) + (b * a.hidden_stride + j * v.hidden_pos_stride) * hsize;
        n[j] = s.num_generated + static_cast<int32_t>(j);
      }
      head_values(a, rows.data(), n.data(), budget.data(), static_cast<int>(v.K1), values.data(), scratch());
    }
    for (int64_t j = 0; j < v.K1; ++j) {
      const int64_t o = b * v.K1 + j;
      Judged out{-1, kNaN, kNaN};
      if (in_run) {
        const bool drafted = j < K && j < len;
        Position pos{};
        pos.logits = static_cast<const char*>(a.logits) + (b * a.logits_stride + j * v.logits_pos_stride) * lsize;
        pos.force_bad = j == 0 && malformed;
        pos.spec.on = v.rejection && drafted && r.temperature > 0.0f;
        if (drafted) pos.spec.draft = v.draft_tokens[b * K + j];
        if (v.probs_dims == 3) pos.spec.q = static_cast<const char*>(v.draft_probs) + (b * K + j) * a.V * (v.probs_dtype == kFloat32 ? 4 : 2);
        pos.spec.q_dtype = v.probs_dtype;
        out = judge_row(a, r, s, pos, values[j], nullptr);
        const bool emit = out.token >= 0;
        const bool acc = emit && drafted && out.token == pos.spec.draft;
        emitted += emit;
        accepted += acc;
        in_run = acc && s.finish_reason == kNone;
      }
      a.tokens[o] = out.token;
      a.logprobs[o] = out.logprob;
      a.values[o] = out.value;
    }
    store_state(a, b, s);
    v.num_emitted[b] = emitted;
    v.num_accepted[b] = accepted;
  });
  compact_host(a.finish_reason, a.B, a.active_idx, a.num_active);
}

}  // namespace hk

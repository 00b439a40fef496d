// verify_step on the GPU: a thread block judges a row's positions in order with the shared block
// machinery (cuda_rows.cuh) until the run stops, a row at a time over a grid of at most one
// resident wave (row_grid), then one block compacts the batch.
#include "cuda_rows.cuh"
#include "haltkit/verify_step.cuh"

namespace hk {
namespace {

__global__ void __launch_bounds__(kThreads, 1) verify_step_rows(const VerifyStepArgs v) {
  __shared__ Shared sh;
  const DecodeStepArgs& a = v.step;
  for (int64_t b = blockIdx.x; b < a.B; b += gridDim.x) {  // persistent grid: see row_grid
    const int64_t K = v.K1 - 1;
    const RowRequest r = load_request(a, b);
    RowState s = load_state(a, b);
    const bool malformed = s.finish_reason == kNone && malformed_draft(v, b, r);
    const int32_t len = v.draft_lens[b];
    const int64_t lsize = a.logits_dtype == kFloat32 ? 4 : 2, hsize = a.hidden_dtype == kFloat32 ? 4 : 2;
    int32_t emitted = 0, accepted = 0;
    bool in_run = s.finish_reason == kNone;
    for (int64_t j = 0; j < v.K1; ++j) {
      Judged out{-1, kNaN, kNaN};
      if (in_run) {  // uniform across the block
        const bool drafted = j < K && j < len;
        Position pos{};
        pos.logits = static_cast<const char*>(a.logits) + (b * a.logits_stride + j * v.logits_pos_stride) * lsize;
        pos.hidden = a.hidden == nullptr ? nullptr
                     : static_cast<const char*>(a.hidden) + (b * a.hidden_stride + j * v.hidden_pos_stride) * hsize;
        pos.force_bad = j == 0 && malformed;
        pos.spec.on = v.rejection && drafted && r.temperature > 0.0f;
        if (drafted) pos.spec.draft = v.draft_tokens[b * K + j];
        if (v.probs_dims == 3)
          pos.spec.q = static_cast<const char*>(v.draft_probs) + (b * K + j) * a.V * (v.probs_dtype == kFloat32 ? 4 : 2);
        pos.spec.q_dtype = v.probs_dtype;
        out = block_judge(a, r, s, pos, sh);
        const bool emit = out.token >= 0;
        const bool acc = emit && drafted && out.token == pos.spec.draft;
        emitted += emit;
        accepted += acc;
        in_run = acc && s.finish_reason == kNone;
      }
      if (threadIdx.x == 0) {
        a.tokens[b * v.K1 + j] = out.token;
        a.logprobs[b * v.K1 + j] = out.logprob;
        a.values[b * v.K1 + j] = out.value;
      }
    }
    if (threadIdx.x == 0) {
      store_state(a, b, s);
      v.num_emitted[b] = emitted;
      v.num_accepted[b] = accepted;
    }
    __syncthreads();  // the next row reuses `sh`
  }
}

}  // namespace

void verify_step_cuda(const VerifyStepArgs& v, int device, void* stream) {
  const DeviceGuard guard(device);
  const DecodeStepArgs& a = v.step;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  HK_LAUNCH(verify_step_rows, row_grid(verify_step_rows, a.B), kThreads, 0, st)(v);
  compact_after("verify_step_rows launch", a, st);
}

}  // namespace hk

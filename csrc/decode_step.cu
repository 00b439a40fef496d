// decode_step on the GPU: one thread block judges each row with the shared block machinery
// (cuda_rows.cuh), then one block compacts the batch.
#include "cuda_rows.cuh"

namespace hk {
namespace {

__global__ void __launch_bounds__(kThreads, 1) decode_step_rows(const DecodeStepArgs a) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  const RowRequest r = load_request(a, b);
  RowState s = load_state(a, b);
  Position pos{};
  pos.logits = static_cast<const char*>(a.logits) + b * a.logits_stride * (a.logits_dtype == kFloat32 ? 4 : 2);
  pos.hidden = a.hidden == nullptr ? nullptr
               : static_cast<const char*>(a.hidden) + b * a.hidden_stride * (a.hidden_dtype == kFloat32 ? 4 : 2);
  const Judged j = block_judge(a, r, s, pos, sh);
  if (threadIdx.x == 0) {
    store_state(a, b, s);
    a.tokens[b] = j.token;
    a.logprobs[b] = j.logprob;
    a.values[b] = j.value;
  }
}

}  // namespace

void decode_step_cuda(const DecodeStepArgs& a, void* stream) {
  require_device();
  if (a.B > INT32_MAX) throw std::invalid_argument("haltkit._C: B must be < 2^31");
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  decode_step_rows<<<static_cast<unsigned>(a.B), kThreads, 0, st>>>(a);
  compact_after("decode_step_rows launch", a, st);
}

}  // namespace hk

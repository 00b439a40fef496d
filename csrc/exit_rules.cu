// exit_rules on the GPU (see haltkit/exit_rules.cuh): a thread block per row, over a grid of at
// most one resident wave (row_grid). Every thread runs the row's scalar rules (same inputs, same
// result); the block evaluates the head and writes the forced logits row; thread 0 stores the
// state and the plan.
#include "cuda_rows.cuh"
#include "haltkit/exit_rules.cuh"

namespace hk {
namespace {

__global__ void __launch_bounds__(kThreads, 1) exit_rules_rows(const ExitRulesArgs x) {
  __shared__ Shared sh;
  const DecodeStepArgs& a = x.step;
  for (int64_t b = blockIdx.x; b < a.B; b += gridDim.x) {  // persistent grid: see row_grid
    if (!x.active[b]) continue;  // uniform across the block
    const RowRequest r = load_request(a, b);
    RowState s = load_state(a, b);
    commit_row(x, b, r, s);
    float value = kNaN;
    if (a.hidden != nullptr && wants_value(r, s)) {  // the same for every thread of the block
      const void* h = static_cast<const char*>(a.hidden) + b * a.hidden_stride * (a.hidden_dtype == kFloat32 ? 4 : 2);
      value = block_head_value(a, h, s.num_generated, feature_budget(r), sh);
    }
    const StepPlan p = plan_step(r, s, /*logits_bad=*/false, value);
    __syncthreads();  // every thread has read the old plan (commit_row) before it is replaced
    if (threadIdx.x == 0) {
      store_state(a, b, s);
      store_plan(p, x.plan + b * kPlanWords);
    }
    const int64_t force = forced_by(x, b, p);
    if (force >= 0 && force < a.V) {  // the Python layer keeps every forced token below V
      float* row = x.logits + b * a.logits_stride;
      for (int64_t i = threadIdx.x; i < a.V; i += kThreads) row[i] = i == force ? 0.0f : -kInf;
    }
  }
}

}  // namespace

void exit_rules_cuda(const ExitRulesArgs& x, int device, void* stream) {
  const DeviceGuard guard(device);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  HK_LAUNCH(exit_rules_rows, row_grid(exit_rules_rows, x.step.B), kThreads, 0, st)(x);
  check(cudaGetLastError(), "exit_rules_rows launch");
}

}  // namespace hk

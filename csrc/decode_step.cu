// decode_step on the GPU: a thread block judges a row at a time with the shared block machinery
// (cuda_rows.cuh), over a grid of at most one resident wave (row_grid), then one block compacts
// the batch. When the batch is too small to fill the GPU, greedy rows' single pass is first split
// over num_parts blocks per row (greedy_parts), and each row's judge merges the slices.
#include "cuda_rows.cuh"

namespace hk {
namespace {

__device__ __forceinline__ const void* row_logits(const DecodeStepArgs& a, int64_t b) {
  return static_cast<const char*>(a.logits) + b * a.logits_stride * (a.logits_dtype == kFloat32 ? 4 : 2);
}

// Slice s of S of a greedy row's groups, scanned by block (s, b): rows split across blocks when
// the batch is too small to fill the GPU. Rows that are finished or not greedy are skipped (their
// judge scans them itself).
__global__ void __launch_bounds__(kThreads, 1) greedy_parts(const DecodeStepArgs a) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.y, S = gridDim.x, s = blockIdx.x;
  if (a.finish_reason[b] != kNone || a.temperature[b] != 0.0f) return;  // uniform across the block
  const Row row = logits_row(a, row_logits(a, b));
  const int64_t G = num_groups(row), per = (G + S - 1) / S;
  const int64_t g1 = (s + 1) * per < G ? (s + 1) * per : G;
  const ThreadScan t = thread_scan(row, s * per + threadIdx.x, g1, /*greedy=*/true);
  const float m = block_reduce(t.max, CheckedMax{}, sh.fred);
  const double mass = block_reduce(static_cast<double>(thread_mass(t, m)), Plus{}, sh.dred);
  const ArgBest best = block_argbest(t.arg, sh);
  if (threadIdx.x == 0) a.parts[b * S + s] = GreedyPart{m, best.index, mass};
}

__global__ void __launch_bounds__(kThreads, 1) decode_step_rows(const DecodeStepArgs a) {
  __shared__ Shared sh;
  for (int64_t b = blockIdx.x; b < a.B; b += gridDim.x) {  // persistent grid: see row_grid
    const RowRequest r = load_request(a, b);
    RowState s = load_state(a, b);
    Position pos{};
    pos.logits = row_logits(a, b);
    pos.hidden = a.hidden == nullptr ? nullptr
                 : static_cast<const char*>(a.hidden) + b * a.hidden_stride * (a.hidden_dtype == kFloat32 ? 4 : 2);
    if (a.num_parts > 1) pos.parts = a.parts + b * a.num_parts, pos.num_parts = a.num_parts;
    const Judged j = block_judge(a, r, s, pos, sh);
    if (threadIdx.x == 0) {
      store_state(a, b, s);
      a.tokens[b] = j.token;
      a.logprobs[b] = j.logprob;
      a.values[b] = j.value;
    }
    __syncthreads();  // the next row reuses `sh`
  }
}

}  // namespace

void decode_step_cuda(const DecodeStepArgs& a, int device, void* stream) {
  const DeviceGuard guard(device);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.num_parts > 1) {  // a small batch: greedy rows' pass 1 spread over more blocks first
    if (a.B > 65535 || a.num_parts > INT32_MAX || a.parts == nullptr)
      throw std::invalid_argument("haltkit._C: splitting rows needs B <= 65535 and a workspace");
    HK_LAUNCH(greedy_parts, dim3(static_cast<unsigned>(a.num_parts), static_cast<unsigned>(a.B)), kThreads, 0, st)(a);
    check(cudaGetLastError(), "greedy_parts launch");
  }
  HK_LAUNCH(decode_step_rows, row_grid(decode_step_rows, a.B), kThreads, 0, st)(a);
  compact_after("decode_step_rows launch", a, st);
}

// Whether this build's kernels can run on `device`: the driver must support the CUDA version the
// module was built with, and the module must hold code the GPU can run (SASS for its arch, or
// PTX it can JIT). Asking for a kernel's attributes loads the module's code for the device,
// exactly what the first launch would do, without launching anything.
void probe_cuda(int device) {
  require_device();
  int driver = 0, runtime = 0;
  check(cudaDriverGetVersion(&driver), "cudaDriverGetVersion");
  check(cudaRuntimeGetVersion(&runtime), "cudaRuntimeGetVersion");
  if (driver < runtime)
    throw std::runtime_error("haltkit._C: built with CUDA " + std::to_string(runtime / 1000) + "." +
                             std::to_string(runtime % 1000 / 10) + ", but the NVIDIA driver supports CUDA " +
                             std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) +
                             " only (CUDA 13 needs a driver >= 580)");
  const DeviceGuard guard(device);
  int major = 0, minor = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  cudaFuncAttributes attr{};
  const cudaError_t e = cudaFuncGetAttributes(&attr, decode_step_rows);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("haltkit._C: its kernels cannot run on device " + std::to_string(device) +
                             " (compute capability " + std::to_string(major) + "." + std::to_string(minor) +
                             "; the module holds sm_80 and sm_90a code and compute_90 PTX): " + cudaGetErrorString(e));
  }
}

}  // namespace hk

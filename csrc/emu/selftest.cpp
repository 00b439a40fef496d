// Small kernels with known bugs, so the tests can show that the emulator's checks fire (each bug
// is one a real kernel could ship with), next to one correct kernel for contrast.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "emu_config.h"

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;

// A block sum as haltkit's block_reduce computes it; `first_barrier` false drops the barrier
// between the warps' writes and the reads of every warp's partial.
__global__ void block_sum(const double* in, double* out, bool first_barrier) {
  __shared__ double partial[kThreads / 32];
  double v = in[threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  if (first_barrier) __syncthreads();
  double r = 0.0;
  for (int w = 0; w < kThreads / 32; ++w) r += partial[w];
  __syncthreads();
  out[threadIdx.x] = r;
}

__global__ void barrier_under_lane_zero(double* out) {
  if (threadIdx.x % 32 == 0) __syncthreads();
  __syncthreads();
  out[threadIdx.x] = 1.0;
}

__global__ void half_warp_mask(double* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0, 1);
}

__global__ void divergent_shuffle(double* out) {
  double v = 1.0;
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(kFull, v, 1);
  } else {
    v = __shfl_xor_sync(kFull, v, 2);
  }
  out[threadIdx.x] = v;
}

__global__ void return_before_barrier(double* out) {
  if (threadIdx.x >= kThreads / 2) return;
  __syncthreads();
  out[threadIdx.x] = 1.0;
}

}  // namespace

namespace hkemu {

std::vector<double> selftest(const std::string& name) {
  std::vector<double> in(kThreads), out(kThreads, -1.0);
  for (int i = 0; i < kThreads; ++i) in[i] = i;
  if (name == "block_sum" || name == "block_sum_without_barrier")
    HK_LAUNCH(block_sum, 1, kThreads, 0, nullptr)(in.data(), out.data(), name == "block_sum");
  else if (name == "barrier_under_lane_zero")
    HK_LAUNCH(barrier_under_lane_zero, 1, kThreads, 0, nullptr)(out.data());
  else if (name == "half_warp_mask")
    HK_LAUNCH(half_warp_mask, 1, kThreads, 0, nullptr)(out.data());
  else if (name == "divergent_shuffle")
    HK_LAUNCH(divergent_shuffle, 1, kThreads, 0, nullptr)(out.data());
  else if (name == "return_before_barrier")
    HK_LAUNCH(return_before_barrier, 1, kThreads, 0, nullptr)(out.data());
  else
    throw std::invalid_argument("selftest: unknown kernel " + name);
  return out;
}

}  // namespace hkemu

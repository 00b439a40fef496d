// A host emulation of the subset of CUDA that haltkit's kernels use, so the unchanged .cu sources
// (csrc/decode_step.cu, verify_step.cu, exit_rules.cu and cuda_rows.cuh) build with g++ into
// haltkit._cuda_emu and run on CPU tensors in CI. The build puts this directory first on the
// include path, so the sources' `#include <cuda_runtime.h>` lands here; launches go through the
// sources' HK_LAUNCH macro, so no text is rewritten.
//
// The execution model (emu.cpp): a launch runs its blocks one after another (blocks of haltkit's
// kernels never wait for each other); within a block every CUDA thread is a fiber with its own
// stack, and fibers switch only at __syncthreads and warp shuffles. Which runnable fiber goes next
// is the schedule (forward, reverse or seeded random; see hkemu::set_schedule), so warps run ahead
// of each other through their shuffles up to the next barrier, in several orders: a missing
// barrier shows as a stale or poisoned read (shared memory is filled with 0xff bytes before each
// block). Threads of a block waiting at different barriers, lanes of a warp at different shuffles,
// threads that exit while others wait, shuffle masks other than the full warp and floating-point
// atomics (whose rounding follows arrival order) stop the launch with a std::runtime_error naming
// the block, threads and source lines.
//
// Not emulated: streams (launches run synchronously, in order, which is one valid stream order),
// memory spaces (device pointers are host pointers), multiple devices (one device, index 0).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

#define HK_CUDA_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Every __shared__ variable is a static in one ELF section, poisoned before each block runs.
#define __shared__ static __attribute__((section("hkemu_shared")))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// 16-byte aligned like CUDA's, so UBSan reports a float4 load from a misaligned address.
struct alignas(16) float4 {
  float x, y, z, w;
};

// The running fiber's coordinates (set by the scheduler before it switches to a fiber).
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

// --- runtime API -------------------------------------------------------------------------------

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};
typedef struct CUstream_st* cudaStream_t;
struct cudaFuncAttributes {
  size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion;
};

cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaDriverGetVersion(int* version);
cudaError_t cudaRuntimeGetVersion(int* version);
const char* cudaGetErrorString(cudaError_t e);
cudaError_t hkemu_func_attributes(cudaFuncAttributes* attr);
cudaError_t hkemu_occupancy(int* blocks);

template <class Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, Kernel) {
  return hkemu_func_attributes(attr);
}
template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  return hkemu_occupancy(blocks);
}

// --- execution model ---------------------------------------------------------------------------

namespace hkemu {

enum class Collective : int { Barrier, ShflXor, ShflUp };

// The calling fiber arrives at a barrier / a shuffle and resumes when the block / warp has.
void syncthreads(const char* file, int line);
uint64_t shuffle(const char* file, int line, Collective kind, unsigned mask, uint64_t bits, int arg);

template <class T>
T shfl(const char* file, int line, Collective kind, unsigned mask, T v, int arg) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  bits = shuffle(file, line, kind, mask, bits, arg);
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Stops the launch: the calling fiber did something the emulated kernels must not (the message says what).
[[noreturn]] void refuse(const char* what);

// Runs body(ctx) as every thread of every block of the grid (see emu.cpp).
void launch(const char* kernel, dim3 grid, dim3 block, void (*body)(void*), void* ctx);

template <class Kernel>
struct Launch {
  const char* name;
  Kernel* kernel;
  dim3 grid, block;
  size_t shared_bytes;  // dynamic shared memory: none of haltkit's kernels asks for any
  cudaStream_t stream;  // launches run synchronously, in order
  template <class... Args>
  void operator()(const Args&... args) const {
    // Each fiber copies the arguments into its own parameters, as a CUDA thread gets its own.
    const std::tuple<Args...> held(args...);
    auto run = [&] { std::apply(kernel, held); };
    launch(name, grid, block, [](void* f) { (*static_cast<decltype(run)*>(f))(); }, &run);
  }
};

}  // namespace hkemu

#define __syncthreads() ::hkemu::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask) \
  ::hkemu::shfl(__FILE__, __LINE__, ::hkemu::Collective::ShflXor, mask, v, lane_mask)
#define __shfl_up_sync(mask, v, delta) ::hkemu::shfl(__FILE__, __LINE__, ::hkemu::Collective::ShflUp, mask, v, delta)
#define HK_LAUNCH(kernel, grid, block, smem, stream) \
  ::hkemu::Launch<decltype(kernel)>{#kernel, kernel, dim3(grid), dim3(block), static_cast<size_t>(smem), stream}

// Fibers never preempt each other, so a read-modify-write is atomic as written.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
// Floating-point atomics round in arrival order, which varies from run to run on a GPU, and
// haltkit promises the same token for the same seed: the emulator stops a kernel that uses them.
inline float atomicAdd(float*, float) {
  ::hkemu::refuse("atomicAdd on float (its rounding follows the threads' arrival order)");
}
inline double atomicAdd(double*, double) {
  ::hkemu::refuse("atomicAdd on double (its rounding follows the threads' arrival order)");
}
inline int atomicMin(int* p, int v) {
  const int old = *p;
  *p = v < old ? v : old;
  return old;
}

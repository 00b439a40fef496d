// The scheduler of the CUDA host emulation (see cuda_runtime.h for the model).
//
// A block's threads are fibers on one OS thread. A fiber runs until it arrives at a collective
// (__syncthreads or a warp shuffle) or returns; then the scheduler picks the next runnable fiber
// by the schedule: the lowest thread index (forward), the highest (reverse) or a seeded random
// one. A barrier releases when every thread of the block has arrived at the same one; a shuffle
// when the 32 lanes of the warp have arrived at the same one, and exchanges their values then.
// Anything else is a kernel bug the GPU may or may not show; here it stops the launch:
//   - threads of a block at different barriers, or lanes of a warp at different shuffles
//     (compared by source line and by how many barriers / shuffles each has passed);
//   - a thread that returns while others of its block wait at a barrier or of its warp at a
//     shuffle;
//   - a shuffle mask other than 0xffffffff (haltkit's kernels only use full warps);
//   - a floating-point atomicAdd (its rounding follows arrival order: not reproducible);
//   - no runnable fiber left while some still wait (a deadlock).
#include "cuda_runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "emu_config.h"

uint3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0};
dim3 blockDim, gridDim;

// Bounds of the __shared__ section (the linker defines them for a section named like a C identifier).
extern "C" char __start_hkemu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_hkemu_shared[] __attribute__((weak, visibility("hidden")));

namespace hkemu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 512 * 1024;  // lazily committed; generous for sanitizer builds

enum class St : uint8_t { Ready, Barrier, Shuffle, Done };

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;  // kStackBytes plus a guard page below
  int tid = 0;
  St st = St::Ready;
  Collective kind = Collective::Barrier;
  const char* file = nullptr;
  int line = 0;
  uint64_t bars = 0, shfls = 0;  // barriers / shuffles this thread has arrived at in this block
  unsigned mask = 0;
  int arg = 0;
  uint64_t value = 0, result = 0;
};

struct Config {
  Schedule schedule = Schedule::Forward;
  uint64_t seed = 0;
  int sms = 3;
};

Config g_config;
Stats g_stats;
std::mutex g_launch_mutex;  // one launch at a time: the fibers share the globals below

// The running launch.
Fiber g_fibers[kMaxThreads];
int g_threads = 0;  // per block
uint64_t g_ready[kMaxThreads / 64];
int g_at_barrier = 0, g_done = 0;
int g_warp_arrived[kMaxThreads / 32], g_warp_done[kMaxThreads / 32];
Fiber* g_current = nullptr;
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
const char* g_kernel = "";
std::string g_error;
uint64_t g_rng = 0;
#if defined(__x86_64__)
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched_ctx;
#endif

}  // namespace
}  // namespace hkemu

// --- context switching -------------------------------------------------------------------------

#if defined(__x86_64__)
// hkemu_switch(save, to): saves the callee-saved registers on the current stack, stores its
// pointer in *save, and resumes the stack `to` (System V: rbx, rbp, r12-r15 are callee-saved;
// the caller's own code saves the rest around the call). A new fiber's stack holds zeros for
// those registers, with rbx = the fiber, and returns into hkemu_trampoline.
extern "C" void hkemu_switch(void** save, void* to) __attribute__((visibility("hidden")));
extern "C" void hkemu_trampoline() __attribute__((visibility("hidden")));
extern "C" [[noreturn]] void hkemu_fiber_main(hkemu::Fiber* f) __attribute__((visibility("hidden"), used));
asm(R"(
  .text
  .globl hkemu_switch
  .hidden hkemu_switch
  .type hkemu_switch, @function
hkemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size hkemu_switch, .-hkemu_switch
  .globl hkemu_trampoline
  .hidden hkemu_trampoline
  .type hkemu_trampoline, @function
hkemu_trampoline:
  movq %rbx, %rdi
  call hkemu_fiber_main
  ud2
  .size hkemu_trampoline, .-hkemu_trampoline
)");
#else
extern "C" [[noreturn]] void hkemu_fiber_main(hkemu::Fiber* f);
static void hkemu_fiber_entry(unsigned lo, unsigned hi) {
  hkemu_fiber_main(reinterpret_cast<hkemu::Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

namespace hkemu {
namespace {

void to_scheduler() {
#if defined(__x86_64__)
  hkemu_switch(&g_current->sp, g_sched_sp);
#else
  swapcontext(&g_current->ctx, &g_sched_ctx);
#endif
}

void to_fiber(Fiber* f) {
  ++g_stats.switches;
#if defined(__x86_64__)
  hkemu_switch(&g_sched_sp, f->sp);
#else
  swapcontext(&g_sched_ctx, &f->ctx);
#endif
}

void start_fiber(Fiber* f) {
  if (f->stack == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("haltkit._cuda_emu: cannot map a fiber stack");
    mprotect(mem, page, PROT_NONE);  // a guard page: an overflow faults instead of corrupting
    f->stack = static_cast<char*>(mem) + page;
  }
#if defined(__x86_64__)
  // Top of stack: 16-byte aligned after the trampoline's "return", as a call site leaves it.
  // Staggered by thread so the fibers' hot frames do not all fall into the same cache sets.
  const size_t stagger = static_cast<size_t>(f->tid) * 832 % 32768;
  auto top = reinterpret_cast<uintptr_t>(f->stack + kStackBytes - stagger) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<void**>(top - 16) - 7;
  // r15 r14 r13 r12 rbx rbp ret
  frame[0] = frame[1] = frame[2] = frame[3] = nullptr;
  frame[4] = f;
  frame[5] = nullptr;
  frame[6] = reinterpret_cast<void*>(&hkemu_trampoline);
  f->sp = frame;
#else
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = f->stack;
  f->ctx.uc_stack.ss_size = kStackBytes;
  f->ctx.uc_link = nullptr;
  const auto p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->ctx, reinterpret_cast<void (*)()>(&hkemu_fiber_entry), 2, static_cast<unsigned>(p),
              static_cast<unsigned>(p >> 32));
#endif
}

std::string where(const Fiber& f) {
  const char* base = f.file == nullptr ? "?" : f.file;
  for (const char* p = base; *p; ++p)
    if (*p == '/') base = p + 1;
  const char* what = f.st == St::Done            ? "returned"
                     : f.kind == Collective::Barrier ? "__syncthreads"
                     : f.kind == Collective::ShflXor ? "__shfl_xor_sync"
                                                     : "__shfl_up_sync";
  if (f.st == St::Done) return what;
  const uint64_t n = f.kind == Collective::Barrier ? f.bars : f.shfls;
  return std::string(what) + " at " + base + ":" + std::to_string(f.line) + " (#" + std::to_string(n) + " of its kind)";
}

std::string block_name() {
  return std::string(g_kernel) + " block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ")";
}

// Records the first error and returns to the scheduler for good (the launch is abandoned).
[[noreturn]] void fail(const std::string& what) {
  if (g_error.empty()) g_error = "haltkit._cuda_emu: " + block_name() + ": " + what;
  for (;;) to_scheduler();
}

void set_ready(int tid) { g_ready[tid >> 6] |= uint64_t{1} << (tid & 63); }
void clear_ready(int tid) { g_ready[tid >> 6] &= ~(uint64_t{1} << (tid & 63)); }

// Warps may pass different numbers of shuffles between two barriers (a loop over warps' units),
// so barriers compare barrier counts and shuffles shuffle counts.
bool same_collective(const Fiber& a, const Fiber& b) {
  return a.kind == b.kind && a.line == b.line && a.bars == b.bars && (a.kind == Collective::Barrier || a.shfls == b.shfls) &&
         (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

void release_barrier() {
  if (g_done > 0) {
    for (int t = 0; t < g_threads; ++t)
      if (g_fibers[t].st == St::Barrier)
        fail("thread " + std::to_string(t) + " waits at " + where(g_fibers[t]) +
             " while other threads of its block have returned");
  }
  const Fiber& first = g_fibers[0];
  for (int t = 1; t < g_threads; ++t)
    if (!same_collective(first, g_fibers[t]))
      fail("threads 0 and " + std::to_string(t) + " wait at different barriers: " + where(first) + " vs " +
           where(g_fibers[t]));
  for (int t = 0; t < g_threads; ++t) g_fibers[t].st = St::Ready, set_ready(t);
  g_at_barrier = 0;
  ++g_stats.barriers;
}

void release_warp(int w) {
  const int lo = 32 * w;
  if (g_warp_done[w] > 0) {
    for (int t = lo; t < lo + 32; ++t)
      if (g_fibers[t].st == St::Shuffle)
        fail("lane " + std::to_string(t - lo) + " of warp " + std::to_string(w) + " waits at " + where(g_fibers[t]) +
             " while other lanes of its warp have returned");
  }
  for (int t = lo + 1; t < lo + 32; ++t)
    if (!same_collective(g_fibers[lo], g_fibers[t]) || g_fibers[t].arg != g_fibers[lo].arg)
      fail("lanes 0 and " + std::to_string(t - lo) + " of warp " + std::to_string(w) + " are at different shuffles: " +
           where(g_fibers[lo]) + " (" + std::to_string(g_fibers[lo].arg) + ") vs " + where(g_fibers[t]) + " (" +
           std::to_string(g_fibers[t].arg) + ")");
  for (int l = 0; l < 32; ++l) {
    Fiber& f = g_fibers[lo + l];
    int src = l;
    if (f.kind == Collective::ShflXor) src = l ^ (f.arg & 31);
    if (f.kind == Collective::ShflUp) src = l >= f.arg ? l - f.arg : l;
    f.result = g_fibers[lo + src].value;
  }
  for (int t = lo; t < lo + 32; ++t) g_fibers[t].st = St::Ready, set_ready(t);
  g_warp_arrived[w] = 0;
  ++g_stats.shuffles;
}

// The next fiber to run by the schedule, or -1 when none is runnable.
int pick() {
  const int words = (g_threads + 63) / 64;
  switch (g_config.schedule) {
    case Schedule::Forward:
      for (int i = 0; i < words; ++i)
        if (g_ready[i]) return 64 * i + __builtin_ctzll(g_ready[i]);
      return -1;
    case Schedule::Reverse:
      for (int i = words - 1; i >= 0; --i)
        if (g_ready[i]) return 64 * i + 63 - __builtin_clzll(g_ready[i]);
      return -1;
    case Schedule::Random: {
      g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;  // xorshift64
      const int start = static_cast<int>(g_rng % static_cast<uint64_t>(g_threads));
      // The first runnable fiber at or after `start`, wrapping around.
      for (int k = 0; k <= words; ++k) {
        const int i = (start / 64 + k) % words;
        uint64_t w = g_ready[i];
        if (k == 0) w &= ~uint64_t{0} << (start & 63);
        if (w) return 64 * i + __builtin_ctzll(w);
      }
      return -1;
    }
  }
  return -1;
}

void run_block() {
  for (int t = 0; t < g_threads; ++t) {
    Fiber& f = g_fibers[t];
    f.tid = t;
    f.st = St::Ready;
    f.bars = f.shfls = 0;
    start_fiber(&f);
  }
  std::memset(g_ready, 0, sizeof g_ready);
  for (int t = 0; t < g_threads; ++t) set_ready(t);
  g_at_barrier = g_done = 0;
  std::memset(g_warp_arrived, 0, sizeof g_warp_arrived);
  std::memset(g_warp_done, 0, sizeof g_warp_done);
  // Shared memory starts as garbage on a GPU: 0xff bytes are NaN floats, -1 and huge counts.
  if (__start_hkemu_shared != nullptr) std::memset(__start_hkemu_shared, 0xff, __stop_hkemu_shared - __start_hkemu_shared);
  while (g_done < g_threads) {
    const int t = pick();
    if (t < 0) {
      std::string states;  // runs of consecutive threads in the same place
      for (int u = 0; u < g_threads && states.size() < 800;) {
        const std::string here = where(g_fibers[u]);
        int v = u + 1;
        while (v < g_threads && where(g_fibers[v]) == here) ++v;
        states += " threads " + std::to_string(u) + "-" + std::to_string(v - 1) + ": " + here + ";";
        u = v;
      }
      g_error = "haltkit._cuda_emu: " + block_name() + ": deadlock, no thread can run:" + states;
    }
    if (!g_error.empty()) throw std::runtime_error(g_error);
    g_current = &g_fibers[t];
    threadIdx = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    to_fiber(g_current);
    if (!g_error.empty()) throw std::runtime_error(g_error);
  }
}

}  // namespace

void syncthreads(const char* file, int line) {
  Fiber& f = *g_current;
  f.st = St::Barrier, f.kind = Collective::Barrier, f.file = file, f.line = line, f.arg = 0;
  ++f.bars;
  clear_ready(f.tid);
  if (++g_at_barrier + g_done == g_threads) release_barrier();
  to_scheduler();
}

uint64_t shuffle(const char* file, int line, Collective kind, unsigned mask, uint64_t bits, int arg) {
  Fiber& f = *g_current;
  f.st = St::Shuffle, f.kind = kind, f.file = file, f.line = line, f.mask = mask, f.arg = arg, f.value = bits;
  ++f.shfls;
  if (mask != 0xffffffffu) {
    char m[16];
    std::snprintf(m, sizeof m, "0x%08x", mask);
    fail("lane " + std::to_string(f.tid % 32) + " of warp " + std::to_string(f.tid / 32) + ": " + where(f) +
         " with mask " + m + "; only full-warp masks are emulated (and used by haltkit's kernels)");
  }
  const int w = f.tid / 32;
  if (32 * w + 32 > g_threads) fail("a shuffle in a partial warp (block of " + std::to_string(g_threads) + " threads)");
  clear_ready(f.tid);
  if (++g_warp_arrived[w] + g_warp_done[w] == 32) release_warp(w);
  to_scheduler();
  return f.result;
}

void refuse(const char* what) {
  fail("thread " + std::to_string(g_current->tid) + ": " + what);
}

void launch(const char* kernel, dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  if (threads < 1 || threads > kMaxThreads || grid.x < 1 || grid.y < 1 || grid.z < 1)
    throw std::runtime_error(std::string("haltkit._cuda_emu: ") + kernel + ": invalid launch configuration");
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_kernel = kernel;
  g_body = body;
  g_ctx = ctx;
  g_threads = static_cast<int>(threads);
  g_error.clear();
  g_rng = (g_config.seed + 0x9E3779B97F4A7C15ull * ++g_stats.launches) | 1;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        ++g_stats.blocks;
        run_block();
      }
}

void set_schedule(Schedule s, uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_config.schedule = s;
  g_config.seed = seed;
}

Schedule schedule() { return g_config.schedule; }
uint64_t schedule_seed() { return g_config.seed; }
int multiprocessor_count() { return g_config.sms; }
Stats stats() { return g_stats; }

}  // namespace hkemu

extern "C" [[noreturn]] void hkemu_fiber_main(hkemu::Fiber* f) {
  using namespace hkemu;
  g_body(g_ctx);
  f->st = St::Done;
  clear_ready(f->tid);
  ++g_done;
  const int w = f->tid / 32;
  ++g_warp_done[w];
  if (g_at_barrier > 0 && g_at_barrier + g_done == g_threads) release_barrier();
  if (g_warp_arrived[w] > 0 && g_warp_arrived[w] + g_warp_done[w] == 32) release_warp(w);
  for (;;) to_scheduler();
}

// --- runtime API -------------------------------------------------------------------------------

namespace {
int g_device = 0;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = g_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  g_device = device;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = hkemu::multiprocessor_count(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;  // an H100's 9.0
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaDriverGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }  // launch errors are thrown, not recorded
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "unspecified launch failure";
  }
}
cudaError_t hkemu_func_attributes(cudaFuncAttributes* attr) {
  *attr = cudaFuncAttributes{};
  attr->maxThreadsPerBlock = 1024;
  attr->binaryVersion = attr->ptxVersion = 90;
  return cudaSuccess;
}
cudaError_t hkemu_occupancy(int* blocks) {
  *blocks = 1;  // with multiprocessor_count() SMs: that many resident blocks
  return cudaSuccess;
}

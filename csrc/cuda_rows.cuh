// The CUDA launchers' row machinery (decode_step.cu, verify_step.cu, exit_rules.cu): one thread
// block judges one position of one row, then one small block compacts the batch.
//
// A position reads its logits in groups of four tokens (one Philox block; a 16-byte load for fp32
// rows whose start is 16-byte aligned): once for the row check and max (greedy rows also take
// their argmax and softmax mass in that pass, online; temperature-only rows their mass and a
// certified Gumbel-max draw, see thread_scan_draw, so both read the row once), once per radix
// level for top-k / top-p, and once for the kept mass and the Gumbel-max draw, where a group
// skips its Philox and logs when its best z plus the largest possible noise cannot beat the
// thread's best score. Repeat passes hit L2. Summation orders differ from the host build, so
// values and log-probs agree within tolerance; tokens, termination and compaction are exact.
//
// Grids: at large B, at most one resident wave of blocks, each taking rows in a grid-stride loop
// (row_grid); at small B, decode_step first splits each greedy row's single pass over several
// blocks (greedy_parts, in decode_step.cu), and the row's judge merges the slices. Sampled rows,
// whose threshold searches read the row several times, are not split yet.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "haltkit/decode_step.cuh"

// Every kernel launch is written HK_LAUNCH(kernel, grid, block, shared bytes, stream)(args...), so
// the host emulation (csrc/emu/cuda_runtime.h, which defines it first) builds these very sources.
#ifndef HK_LAUNCH
#define HK_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

namespace hk {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBucketsPerThread = kRadixMaxBuckets / kThreads;
constexpr unsigned kFull = 0xffffffffu;

struct ArgBest {
  float score;
  int32_t index;  // lowest index among equal scores; INT32_MAX when empty
};

__device__ __forceinline__ ArgBest better(ArgBest a, ArgBest b) {
  if (b.score > a.score || (b.score == a.score && b.index < a.index)) return b;
  return a;
}

// Top-p's bucket masses are sums of exp(z) <= 1 (z <= 0) in fixed point, exp(z) * 2^f with
// f = 63 - bit width of V, so a whole row's sum fits 64 bits. Integer atomics add exactly: the
// masses, the walk and hence the token are the same whatever order the threads add in (an
// atomicAdd on a double rounds in arrival order, which varies from run to run, and compiles to a
// compare-and-swap loop on shared memory). One unit is at most 2^-32 of the largest token's mass
// (V < 2^31), 2^-45 at V = 151936: far below the float32 rounding of the reference's cumsum.
using Fixed = unsigned long long;  // CUDA's 64-bit atomicAdd type

struct MassScale {
  double to_fixed, to_real;  // 2^f and 2^-f
};

__device__ __forceinline__ MassScale mass_scale(int64_t V) {
  int bits = 0;
  while (bits < 63 && (V >> bits) != 0) ++bits;
  const double one = static_cast<double>(Fixed{1} << (63 - bits));
  return MassScale{one, 1.0 / one};
}

// Round to nearest (e is a float, so e * 2^f is exact in double).
__device__ __forceinline__ Fixed to_fixed(float e, const MassScale& s) {
  return static_cast<Fixed>(static_cast<double>(e) * s.to_fixed + 0.5);
}

struct Shared {
  uint32_t count[kRadixMaxBuckets];
  Fixed mass[kRadixMaxBuckets];  // top-p's bucket masses, in fixed point (see MassScale)
  double dred[kWarps];
  Fixed ured[kWarps];
  float fred[kWarps];
  ArgBest bred[kWarps];
  int64_t scan_count[kWarps];
  Fixed scan_mass[kWarps];
  int32_t found;
  int64_t found_need;
  Fixed found_before;
};

// --- block reductions (every thread gets the result; the combine order is fixed) -------------

template <class T, class Op>
__device__ T block_reduce(T v, Op op, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFull, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
  __syncthreads();
  return r;
}

__device__ ArgBest block_argbest(ArgBest v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) {
    ArgBest other{__shfl_xor_sync(kFull, v.score, o), __shfl_xor_sync(kFull, v.index, o)};
    v = better(v, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh.bred[warp] = v;
  __syncthreads();
  ArgBest r = sh.bred[0];
  for (int w = 1; w < kWarps; ++w) r = better(r, sh.bred[w]);
  __syncthreads();
  return r;
}

struct Plus {
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct CheckedMax {
  __device__ float operator()(float a, float b) const { return checked_max(a, b); }
};

// --- reading a row in groups of four tokens --------------------------------------------------

struct Row {
  const void* ptr;
  int64_t V;
  int32_t dt;
  bool vec;  // fp32 row starting on a 16-byte boundary: whole groups load as one float4
};

// Tokens 4g .. 4g+3 (-inf past the end of the row).
__device__ __forceinline__ void load_group(const Row& row, int64_t g, float x[4]) {
  const int64_t i0 = 4 * g;
  if (row.vec && i0 + 3 < row.V) {
    const float4 q = reinterpret_cast<const float4*>(row.ptr)[g];
    x[0] = q.x, x[1] = q.y, x[2] = q.z, x[3] = q.w;
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) x[j] = i0 + j < row.V ? load_as_float(row.ptr, i0 + j, row.dt) : -kInf;
}

__device__ __forceinline__ int64_t num_groups(const Row& row) { return (row.V + 3) / 4; }

// A logits row of the step (fp32 rows whose start is 16-byte aligned load whole groups at once).
__device__ __forceinline__ Row logits_row(const DecodeStepArgs& a, const void* ptr) {
  return Row{ptr, a.V, a.logits_dtype, a.logits_dtype == kFloat32 && (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0};
}

// --- the value head --------------------------------------------------------------------------

// The head on one hidden row after n tokens: one warp per unit r, lanes across the d + 2 features.
__device__ float block_head_value(const DecodeStepArgs& a, const void* h, int32_t n, int32_t budget, Shared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t w = a.d + 2;
  const float f0 = feature_log1p(n), f1 = feature_fraction(n, budget);
  float partial = 0.0f;
  for (int64_t r = warp; r < a.R; r += kWarps) {
    const void* wr = static_cast<const char*>(a.w1) + r * w * (a.weight_dtype == kFloat32 ? 4 : 2);
    float acc = 0.0f;
    for (int64_t i = lane; i < w; i += 32) {
      const float x = i < a.d ? load_as_float(h, i, a.hidden_dtype) : (i == a.d ? f0 : f1);
      acc += x * load_as_float(wr, i, a.weight_dtype);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
    partial += head_unit(a, r, acc);
  }
  if (lane != 0) partial = 0.0f;  // lane 0 holds its warp's units once
  return block_reduce(partial, Plus{}, sh.fred) + head_bias(a);
}

// --- radix select ----------------------------------------------------------------------------

// Walks a level's buckets from the largest z down (see radix_walk in cpu_rows.h): each
// thread owns consecutive buckets, an exclusive scan gives what lies above them, and the lowest
// bucket meeting the goal wins. Returns it (or -1) and updates need / before for every thread.
// Masses are fixed point (integer sums: exact in any order); `scale` turns them into reals.
__device__ int block_walk(int level, bool by_mass, int64_t* need, Fixed* before, float target, const MassScale& scale,
                          Shared& sh) {
  const int nb = radix_buckets(level);
  const int per = nb / kThreads;  // 4, or 1 at the last level
  const int lo = threadIdx.x * per;
  int64_t c = 0;
  Fixed m = 0;
  for (int j = 0; j < per; ++j) c += sh.count[lo + j], m += sh.mass[lo + j];
  // Exclusive scan of (c, m) over threads, in thread order (deterministic).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t ci = c;
  Fixed mi = m;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t cu = __shfl_up_sync(kFull, ci, o);
    const Fixed mu = __shfl_up_sync(kFull, mi, o);
    if (lane >= o) ci += cu, mi += mu;
  }
  if (lane == 31) sh.scan_count[warp] = ci, sh.scan_mass[warp] = mi;
  if (threadIdx.x == 0) sh.found = INT32_MAX;
  __syncthreads();
  int64_t c_before = ci - c;
  Fixed m_before = mi - m;
  for (int w = 0; w < warp; ++w) c_before += sh.scan_count[w], m_before += sh.scan_mass[w];
  for (int j = 0; j < per; ++j) {
    const int bkt = lo + j;
    const bool hit = by_mass ? mass_reaches(static_cast<double>(*before + m_before + sh.mass[bkt]) * scale.to_real, target)
                             : c_before + sh.count[bkt] >= *need;
    if (hit) {
      atomicMin(&sh.found, bkt);
      break;
    }
    c_before += sh.count[bkt];
    m_before += sh.mass[bkt];
  }
  __syncthreads();
  const int found = sh.found;
  if (found != INT32_MAX && lo <= found && found < lo + per) {
    // The owner of the found bucket knows what the buckets above it hold.
    int64_t cb = ci - c;
    Fixed mb = mi - m;
    for (int w = 0; w < warp; ++w) cb += sh.scan_count[w], mb += sh.scan_mass[w];
    for (int bkt = lo; bkt < found; ++bkt) cb += sh.count[bkt], mb += sh.mass[bkt];
    sh.found_need = *need - cb;
    sh.found_before = *before + mb;
  }
  __syncthreads();
  if (found == INT32_MAX) return -1;
  *need = sh.found_need;
  *before = sh.found_before;
  __syncthreads();
  return found;
}

// The z at which, walking the row's z >= floor from the largest down, the running count first
// reaches k, or (by_mass) the running exp-mass first reaches top_p times the total.
__device__ float block_radix_select(const Row& row, float m, float t, float floor, bool by_mass, int64_t k,
                                    float top_p, Shared& sh) {
  int64_t need = k;
  Fixed before = 0;
  float target = 0.0f;
  uint32_t prefix = 0;
  const MassScale scale = mass_scale(row.V);
  for (int level = 0; level < kRadixLevels; ++level) {
    const int nb = radix_buckets(level);
    for (int i = threadIdx.x; i < nb; i += kThreads) sh.count[i] = 0, sh.mass[i] = 0;
    __syncthreads();
    for (int64_t g = threadIdx.x; g < num_groups(row); g += kThreads) {
      float x[4];
      load_group(row, g, x);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float z = (x[j] - m) / t;
        const uint32_t key = order_key(z);
        // Past the row's end x = -inf: z = -inf is below any floor but -inf, so mask by index.
        if (4 * g + j >= row.V || !(z >= floor) || !radix_match(key, prefix, level)) continue;
        const uint32_t bkt = radix_bucket(key, level);
        atomicAdd(&sh.count[bkt], 1u);
        if (by_mass) atomicAdd(&sh.mass[bkt], to_fixed(exp_f(z), scale));
      }
    }
    __syncthreads();
    if (by_mass && level == 0) {
      Fixed part = 0;
      for (int i = threadIdx.x * kBucketsPerThread, e = i + kBucketsPerThread; i < e; ++i) part += sh.mass[i];
      target = top_p_target(static_cast<double>(block_reduce(part, Plus{}, sh.ured)) * scale.to_real, top_p);
    }
    const int bkt = block_walk(level, by_mass, &need, &before, target, scale, sh);
    if (bkt < 0) return -kInf;
    prefix |= static_cast<uint32_t>(bkt) << radix_shift(level);
  }
  return key_value(prefix);
}

// --- speculative sampling ------------------------------------------------------------------

// As speculative_choice in cpu_rows.h: the draft when u * q(x) < p(x), else the Gumbel-max draw
// over max(0, p - q) (p itself when that is empty).
__device__ int64_t block_speculative_choice(const Row& row, float m, float t, float tau, float log_mass,
                                            const SpecDraft& sd, uint64_t seed, uint32_t step, Shared& sh) {
  auto p_of = [&](float x) {
    const float z = (x - m) / t;
    return z >= tau ? exp_f(z - log_mass) : 0.0f;
  };
  const float qx = sd.q != nullptr ? load_as_float(sd.q, sd.draft, sd.q_dtype) : 1.0f;
  const float u = uniform_from_word(philox_word(seed, step, kStreamAccept, 0));
  if (u * qx < p_of(load_as_float(row.ptr, sd.draft, row.dt))) return sd.draft;
  for (int pass = 0; pass < 2; ++pass) {
    const bool residual = pass == 0;
    ArgBest best{-kInf, INT32_MAX};
    for (int64_t g = threadIdx.x; g < num_groups(row); g += kThreads) {
      float x[4];
      load_group(row, g, x);
      const PhiloxWords w = philox_block(seed, step, kStreamResidual, static_cast<uint32_t>(g));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t i = 4 * g + j;
        if (i >= row.V) break;
        const float p = p_of(x[j]);
        float r = p;
        if (residual) {
          r = sd.q != nullptr ? p - load_as_float(sd.q, i, sd.q_dtype) : (i == sd.draft ? 0.0f : p);
          r = r < 0.0f ? 0.0f : r;  // NaN stays NaN and drops out below, as torch.clamp
        }
        if (!(r > 0.0f)) continue;
        const float score = log_f(r) + gumbel_from_word(w.w[j]);
        if (score > best.score) best = ArgBest{score, static_cast<int32_t>(i)};
      }
    }
    best = block_argbest(best, sh);
    if (best.index != INT32_MAX) return best.index;
  }
  return sd.draft;  // unreachable: p is positive at the row's maximum
}

// --- pass 1 ----------------------------------------------------------------------------------

// One thread's share of pass 1 over the groups g0, g0 + kThreads, ... below g1: the row check's
// max (NaN counted as +inf) and, for greedy rows, the first argmax and the online softmax mass
// relative to the thread's max.
struct ThreadScan {
  float max, mass;
  ArgBest arg;
};

__device__ ThreadScan thread_scan(const Row& row, int64_t g0, int64_t g1, bool greedy) {
  ThreadScan t{-kInf, 0.0f, ArgBest{-kInf, INT32_MAX}};
  for (int64_t g = g0; g < g1; g += kThreads) {
    float x[4];
    load_group(row, g, x);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (4 * g + j >= row.V) break;
      const float nm = checked_max(t.max, x[j]);
      if (greedy) {
        if (x[j] > t.arg.score) t.arg = ArgBest{x[j], static_cast<int32_t>(4 * g + j)};
        if (nm > t.max) {
          t.mass = (t.max == -kInf ? 0.0f : t.mass * exp_f(t.max - nm)) + (nm == kInf ? 0.0f : 1.0f);
        } else if (nm != -kInf) {
          t.mass += exp_f(x[j] - nm);
        }
      }
      t.max = nm;
    }
  }
  return t;
}

// The thread's mass relative to the block's max m.
__device__ float thread_mass(const ThreadScan& t, float m) { return t.max == -kInf ? 0.0f : t.mass * exp_f(t.max - m); }

// A temperature-only row's pass 1 with its Gumbel-max draw folded in, so the row is read once
// (as the Triton kernel does). The max M, which the reference's scores z + G = (x - M) / t + G
// are taken against, is known only when the pass ends, so each thread ranks its tokens by the
// key (x - r) / t + G for a shift r every thread knows in advance (the row's first four tokens'
// max), keeping its best and runner-up. A key is its token's score plus (M - r) / t, up to
// rounding; block_certified_draw decides afterwards whether the winners by key are the winners
// by score, and when it cannot, the caller runs the exact pass 2.
struct DrawScan {
  float max, mass;    // the thread's max (NaN counted as +inf), sum of exp((x - max) / t)
  float key, second;  // its best and runner-up keys (-inf: none)
  float x, g;         // the best's logit and noise
  int32_t idx;        // the best's token
};

constexpr float kDrawSlack = 1.0f;  // keys this far below the thread's best skip their noise

__device__ DrawScan thread_scan_draw(const Row& row, int64_t g0, int64_t g1, float t, float r, uint64_t seed,
                                     uint32_t step) {
  DrawScan d{-kInf, 0.0f, -kInf, -kInf, 0.0f, 0.0f, INT32_MAX};
  for (int64_t g = g0; g < g1; g += kThreads) {
    float x[4], k[4];
    load_group(row, g, x);
    float kmax = -kInf;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bool in = 4 * g + j < row.V;
      const float nm = in ? checked_max(d.max, x[j]) : d.max;
      if (nm > d.max) {
        d.mass = (d.max == -kInf ? 0.0f : d.mass * exp_f((d.max - nm) / t)) + (nm == kInf ? 0.0f : 1.0f);
      } else if (in && nm != -kInf) {
        d.mass += exp_f((x[j] - nm) / t);
      }
      d.max = nm;
      k[j] = in ? (x[j] - r) / t : -kInf;
      kmax = fmaxf(kmax, k[j]);  // fmaxf passes over a NaN (whose row is an ERROR anyway)
    }
    // Exact pruning: every key of this group is below the thread's best by more than the slack,
    // so none can be its winner or a runner-up the certificate looks at.
    if (!(kmax > -kInf) || kmax + kGumbelMax < d.key - kDrawSlack) continue;
    const PhiloxWords w = philox_block(seed, step, kStreamToken, static_cast<uint32_t>(g));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (!(k[j] > -kInf)) continue;
      const float gj = gumbel_from_word(w.w[j]);
      const float key = k[j] + gj;
      if (key > d.key) {
        d.second = d.key;
        d.key = key, d.x = x[j], d.g = gj, d.idx = static_cast<int32_t>(4 * g + j);
      } else {
        d.second = fmaxf(d.second, key);  // a tie lands here and fails the certificate
      }
    }
  }
  return d;
}

// Whether thread_scan_draw's draw is the reference's, for a row with max m, and its token. The
// threads' winners by key are rescored exactly, (x - m) / t + G as pass 2 computes it, and the
// best score wins (the lowest index on ties, as argmax). A key and its token's score differ by
// the constant (m - r) / t and rounding of at most 2^-20 (|key| + |m - r| / t + 9) near the top;
// the margin is 4x that. A thread whose best is within half the slack of the block's best must
// hold its runner-up beyond the margin; the others lie more than that below and cannot hold
// the winner. (The Triton kernel certifies its lanes the same way.)
__device__ bool block_certified_draw(const DrawScan& d, float m, float t, float r, Shared& sh, int64_t* token) {
  const float best = block_reduce(d.key, CheckedMax{}, sh.fred);
  const float bound = 3.814697265625e-06f * (fabsf(d.key) + fabsf(m - r) / t + 64.0f);
  const bool relevant = d.key >= best - 0.5f * kDrawSlack;
  const float fails = block_reduce(relevant && !(d.second + bound < d.key) ? 1.0f : 0.0f, Plus{}, sh.fred);
  const float worst = block_reduce(relevant ? bound : 0.0f, CheckedMax{}, sh.fred);
  const float exact = d.key > -kInf ? (d.x - m) / t + d.g : -kInf;
  const ArgBest win = block_argbest(ArgBest{exact, d.idx}, sh);
  *token = win.index;
  return best > -kInf && fails == 0.0f && worst < 0.25f * kDrawSlack && win.index != INT32_MAX;
}

struct GreedyMerge {
  float max;
  double mass;
  int32_t arg;
};

// A greedy row from its slices, in slice order: the first slice reaching the max holds the
// first argmax. Every thread reads the same few parts and computes the same result.
__device__ GreedyMerge merge_parts(const GreedyPart* parts, int64_t S) {
  GreedyMerge g{-kInf, 0.0, INT32_MAX};
  for (int64_t s = 0; s < S; ++s) g.max = checked_max(g.max, parts[s].max);
  for (int64_t s = 0; s < S; ++s) {
    const GreedyPart q = parts[s];
    if (q.max != -kInf) g.mass += q.mass * static_cast<double>(exp_f(q.max - g.max));
    if (g.arg == INT32_MAX && q.max == g.max) g.arg = q.arg;
  }
  return g;
}

// --- one position of one row ----------------------------------------------------------------

// Judges one position as decode_step specifies (see judge in cpu_rows.h). Every thread of the
// block returns the same result and leaves the same state in `s`.
__device__ Judged block_judge(const DecodeStepArgs& a, const RowRequest& r, RowState& s, const Position& pos,
                              Shared& sh) {
  if (s.finish_reason != kNone) return Judged{-1, kNaN, kNaN};  // uniform across the block
  const bool greedy = r.temperature == 0.0f;
  const Row row = logits_row(a, pos.logits);
  const float value =
      pos.hidden != nullptr ? block_head_value(a, pos.hidden, s.num_generated, feature_budget(r), sh) : kNaN;

  // Pass 1: row check and max; greedy rows also their first argmax and online softmax mass
  // (from the row's slices when other blocks scanned them: see greedy_parts); temperature-only
  // rows that draw also their draw, when it can be certified (see thread_scan_draw).
  const bool merged = greedy && pos.parts != nullptr && !pos.force_bad;  // uniform across the block
  const Filter f = row_filter(r, a.V);
  const float t = row_temperature(r);
  const uint32_t step = static_cast<uint32_t>(s.num_generated);
  float shift = kInf;  // thread_scan_draw's r: the first four tokens' max
  if (!greedy && !f.top_k_on && !f.top_p_on && f.tau_m == -kInf && !pos.force_bad && !pos.spec.on &&
      plan_step(r, s, false, value).draw) {
    float x0[4];
    load_group(row, 0, x0);
    shift = checked_max(checked_max(x0[0], x0[1]), checked_max(x0[2], x0[3]));
  }
  const bool one_pass = !max_is_bad(shift);  // uniform across the block
  ThreadScan ts{-kInf, 0.0f, ArgBest{-kInf, INT32_MAX}};
  DrawScan ds{-kInf, 0.0f, -kInf, -kInf, 0.0f, 0.0f, INT32_MAX};
  float m = -kInf;
  double gmass = 0.0;
  int32_t garg = INT32_MAX;
  if (merged) {
    const GreedyMerge g = merge_parts(pos.parts, pos.num_parts);
    m = g.max, gmass = g.mass, garg = g.arg;
  } else if (one_pass) {
    ds = thread_scan_draw(row, threadIdx.x, num_groups(row), t, shift, r.seed, step);
    m = block_reduce(ds.max, CheckedMax{}, sh.fred);
  } else {
    if (!pos.force_bad) ts = thread_scan(row, threadIdx.x, num_groups(row), greedy);
    m = block_reduce(ts.max, CheckedMax{}, sh.fred);
  }
  const bool bad = pos.force_bad || max_is_bad(m);
  const StepPlan p = plan_step(r, s, bad, value);

  int64_t token = -1;
  float logprob = kNaN;
  if (p.emit && greedy) {
    if (!merged) {
      gmass = block_reduce(static_cast<double>(thread_mass(ts, m)), Plus{}, sh.dred);
      garg = block_argbest(ts.arg, sh).index;
    }
    token = p.forcing ? p.forced_token : garg;
    logprob = (load_as_float(row.ptr, token, row.dt) - m) - log_f(static_cast<float>(gmass));
  } else if (p.emit && one_pass && p.draw &&
             block_certified_draw(ds, m, t, shift, sh, &token)) {  // the row was read once
    const float part = ds.max == -kInf ? 0.0f : ds.mass * exp_f((ds.max - m) / t);
    const double mass = block_reduce(static_cast<double>(part), Plus{}, sh.dred);
    logprob = (load_as_float(row.ptr, token, row.dt) - m) / t - log_f(static_cast<float>(mass));
  } else if (p.emit) {
    token = -1;
    float tau_k = -kInf, tau_p = -kInf;
    if (f.top_k_on) tau_k = block_radix_select(row, m, t, -kInf, false, f.top_k, 0.0f, sh);
    if (f.top_p_on) tau_p = block_radix_select(row, m, t, tau_k, true, 0, f.top_p, sh);
    const float tau = fmaxf(fmaxf(tau_k, tau_p), f.tau_m);
    const bool speculate = p.draw && pos.spec.on;
    const bool draw = p.draw && !speculate;

    // Pass 2: kept mass and the Gumbel-max draw.
    float mass_part = 0.0f;
    ArgBest best{-kInf, INT32_MAX};
    for (int64_t g = threadIdx.x; g < num_groups(row); g += kThreads) {
      float x[4], z[4];
      load_group(row, g, x);
      float zmax = -kInf;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        z[j] = (x[j] - m) / t;
        if (z[j] >= tau && 4 * g + j < a.V) mass_part += exp_f(z[j]), zmax = fmaxf(zmax, z[j]);
      }
      if (!draw || zmax == -kInf || zmax + kGumbelMax < best.score) continue;
      const PhiloxWords w = philox_block(r.seed, step, kStreamToken, static_cast<uint32_t>(g));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (!(z[j] >= tau) || 4 * g + j >= a.V) continue;
        const float score = z[j] + gumbel_from_word(w.w[j]);
        if (score > best.score) best = ArgBest{score, static_cast<int32_t>(4 * g + j)};
      }
    }
    const double mass = block_reduce(static_cast<double>(mass_part), Plus{}, sh.dred);
    const float log_mass = log_f(static_cast<float>(mass));
    if (draw) best = block_argbest(best, sh);
    if (p.forcing) {
      token = p.forced_token;
    } else if (speculate) {
      token = block_speculative_choice(row, m, t, tau, log_mass, pos.spec, r.seed, step, sh);
    } else {
      token = best.index;
    }
    const float zt = (load_as_float(row.ptr, token, row.dt) - m) / t;
    logprob = zt >= tau ? zt - log_mass : -kInf;
  }
  finish_step(r, s, p, token);
  return Judged{p.emit ? token : -1, p.emit ? logprob : kNaN, value};
}

// --- compaction ------------------------------------------------------------------------------

constexpr int kCompactThreads = 1024;

// Order-preserving indices of running rows, -1 padded, and their count: each thread takes a
// contiguous run of rows, a block scan places them.
__global__ void __launch_bounds__(kCompactThreads)
    compact_rows(const int32_t* finish, int64_t B, int64_t* idx, int64_t* num) {
  __shared__ int64_t warp_sums[kCompactThreads / 32];
  const int64_t per = (B + kCompactThreads - 1) / kCompactThreads;
  const int64_t lo = threadIdx.x * per, hi = lo + per < B ? lo + per : B;
  int64_t c = 0;
  for (int64_t i = lo; i < hi; ++i) c += finish[i] == kNone;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t ci = c;
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t u = __shfl_up_sync(kFull, ci, o);
    if (lane >= o) ci += u;
  }
  if (lane == 31) warp_sums[warp] = ci;
  __syncthreads();
  int64_t pos = ci - c, total = 0;
  for (int w = 0; w < kCompactThreads / 32; ++w) {
    if (w < warp) pos += warp_sums[w];
    total += warp_sums[w];
  }
  for (int64_t i = lo; i < hi; ++i)
    if (finish[i] == kNone) idx[pos++] = i;
  for (int64_t i = total + threadIdx.x; i < B; i += kCompactThreads) idx[i] = -1;
  if (threadIdx.x == 0) *num = total;
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a sticky launch error so the caller can go on
    throw std::runtime_error(std::string("haltkit._C: ") + what + ": " + cudaGetErrorString(e));
  }
}

// After a row kernel on `st`: checks its launch, then compacts the batch (in stream order).
void compact_after(const char* kernel, const DecodeStepArgs& a, cudaStream_t st) {
  check(cudaGetLastError(), kernel);
  HK_LAUNCH(compact_rows, 1, kCompactThreads, 0, st)(a.finish_reason, a.B, a.active_idx, a.num_active);
  check(cudaGetLastError(), "compact_rows launch");
}

// Throws a RuntimeError-bound exception when no device can run a kernel (no driver, no GPU).
void require_device() {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    cudaGetLastError();
    throw std::runtime_error(std::string("haltkit._C: no usable CUDA device (") +
                             (e != cudaSuccess ? cudaGetErrorString(e) : "none visible") + ")");
  }
}

// Makes the tensors' device current for a launch (the stream handle belongs to it), restoring the
// caller's device afterwards: the kernels must not follow whatever device the thread last used.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    require_device();
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice to the tensors' device");
    set_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (set_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool set_ = false;
};

// The grid of a row kernel: one block per row up to what the device holds at once, then a
// persistent grid whose blocks take rows in a grid-stride loop (no tail of short-lived blocks at
// large B, and the per-block setup is paid once per block, not once per row). Cached per device.
template <class Kernel>
unsigned row_grid(Kernel kernel, int64_t B) {
  if (B > INT32_MAX) throw std::invalid_argument("haltkit._C: B must be < 2^31");
  constexpr int kMaxDevices = 64;
  static int resident[kMaxDevices] = {};  // blocks that fit on the device at once; 0 = not yet asked
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("haltkit._C: device ordinal out of range");
  if (resident[dev] == 0) {
    int sms = 0, per_sm = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    resident[dev] = sms * (per_sm > 0 ? per_sm : 1);
  }
  return static_cast<unsigned>(B < resident[dev] ? B : resident[dev]);
}

}  // namespace
}  // namespace hk

// The host launchers' row machinery (decode_step_cpu.cpp, verify_step_cpu.cpp): the row logic of
// csrc/include/haltkit in vectorisable loops over one row at a time, on one thread.
//
// Vector paths: AVX-512, or AVX2 + FMA (HK_AVX2) where AVX-512 is missing, for the exps of
// masses, the greedy scan, the kept mass and the head's dot products; AVX2 also for the first
// pass of filtered rows and the candidate gather (AVX-512 builds take the portable loops there);
// portable loops otherwise (tests/cpu_rows_check.cpp checks each ISA's against plain loops).
//
// A row takes a few passes, all but the first over data already in this core's L2:
//   1. read the logits once: row check and max (greedy rows: also the argmax and softmax mass);
//   2. z = (x - max) / t into a per-thread buffer;
//   3. (filtered rows) the top-k / top-p thresholds, by a chunk-maximum bound for small k and a
//      radix select otherwise: no full sort;
//   4. one pass in chunks of 64 tokens: mass of the kept set and the Gumbel-max draw. A chunk
//      whose best z cannot beat the best score so far even with the largest possible noise
//      skips its Philox and logs, so peaked rows draw at little more than the cost of the mass.
// Host code only: it is compiled once per launcher file, inside an anonymous namespace.
#pragma once

#include <algorithm>
#include <cmath>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

// AVX2 + FMA paths (machines without AVX-512, e.g. Zen 2/3): where AVX-512 has a fast path, AVX2
// has one too, unless AVX-512 is there; otherwise the portable loops (HALTKIT_CPU_FLAGS=-march=x86-64
// builds them, and tests/cpu_rows_check.cpp runs both).
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define HK_AVX2 1
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12's avx512fintrin.h leaves the dummy operand of some intrinsics (roundscale, masked
// loads, reductions) uninitialised on purpose, and -W(maybe-)uninitialized reports it (GCC bug
// 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include "haltkit/decode_step.cuh"

namespace hk {
namespace {

constexpr int64_t kChunk = 64;  // tokens per chunk: 16 Philox blocks

struct Scratch {
  std::vector<float> z;          // the row's scaled logits
  std::vector<float> hidden;     // the row's hidden state, as float
  std::vector<uint32_t> keys;    // radix-select candidates (order keys)
  std::vector<float> vals;       // top-k candidates
  uint32_t count[kRadixMaxBuckets];
  double mass[kRadixMaxBuckets];
  // Level 0 scatters into kLanes interleaved histograms: neighbouring tokens often share a
  // bucket, and one histogram would chain every add through store-to-load forwarding.
  static constexpr int kLanes = 4;
  uint32_t count_lanes[kLanes][kRadixMaxBuckets];
  double mass_lanes[kLanes][kRadixMaxBuckets];
};

// One per OpenMP thread, grown on demand and kept across calls.
Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

template <int DT>
inline float ld(const void* row, int64_t i) {
  if constexpr (DT == kFloat32) {
    return static_cast<const float*>(row)[i];
  } else if constexpr (DT == kBFloat16) {
    return bf16_to_float(static_cast<const uint16_t*>(row)[i]);
  } else {
    return half_to_float(static_cast<const uint16_t*>(row)[i]);
  }
}

// --- softmax masses ------------------------------------------------------------------------
// A mass only feeds log-probs, compared within TOL, so it may use a cheaper exp than the kept-set
// decisions (which use exp_f, as the GPU does). With AVX-512: 2^t for t = z log2 e as 2^n times a
// degree-5 polynomial in f = t - n on [-1/2, 1/2] (near-minimax coefficients, fitted for relative
// error: within 2.4e-7 of 2^f in float32), scaled by vscalefps (underflow to 0): about a third of
// exp_f's instructions, which is what keeps greedy rows close to memory-bound.
#if defined(__AVX512F__)
inline __m512 exp16_mass(__m512 z) {
  // Clamped below (NaN and -inf included: maxps returns its second operand then), so the
  // reduction never sees -inf - -inf; exp(-104) is below every float.
  z = _mm512_max_ps(z, _mm512_set1_ps(-104.0f));
  const __m512 t = _mm512_mul_ps(z, _mm512_set1_ps(kLog2e));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.32764e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.67551e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402212f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69314697f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000007f));
  return _mm512_scalef_ps(p, n);  // n = -inf (z = -inf) gives 0
}
#endif

// exp(d) for d <= 0, for a softmax total (the top-p target's, a greedy row's mass): 2^t for t = d log2 e as 2^n times a degree-5
// polynomial in f = t - n on [-1/2, 1/2] (exp16_mass's coefficients with the constant term 1, so
// exp(0) is exactly 1 and the max's own term is exact), t clamped at -126 (the row's total is at
// least 1, and the clamp adds under V * 2^-126). Within 3e-7 relative of exp; about half of
// exp_f's operations, which is the top-p pass's cost.
inline float exp_total(float d) {
  float t = d * kLog2e;
  t = t < -126.0f ? -126.0f : t;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: t + shifter rounds t to an integer
  const float ts = t + shifter;
  const float nf = ts - shifter;
  const int32_t n = static_cast<int32_t>(float_bits(ts) - float_bits(shifter));
  const float f = t - nf;
  float p = 1.32764e-3f;
  p = p * f + 9.67551e-3f;
  p = p * f + 5.550713e-2f;
  p = p * f + 0.2402212f;
  p = p * f + 0.69314697f;
  p = p * f + 1.0f;
  return p * bits_float(static_cast<uint32_t>(n + 127) << 23);
}

#if defined(HK_AVX2)
// exp(d) for d <= 0 in 8 lanes, for masses and totals (exp_total's contract, FMA allowed): 2^t for
// t = d log2 e, as 2^n times exp_total's degree-5 polynomial in f = t - n (constant term 1, so
// exp(0) is exactly 1), 2^n added into the float's exponent field as an integer. Underflow guard:
// t is clamped at -125 (NaN and -inf included: maxps returns its second operand then), so n >= -125
// and the product stays a normal float; a term below 2^-125 comes out under 2^-124 instead of
// (nearly) 0, which a total of at least 1 (the max's own term) never sees. Error: within
// 3e-7 relative of 2^f, plus |d| * 9e-8 relative from rounding t (float d * log2 e), the
// same as exp_total and exp16_mass (tests/cpu_rows_check.cpp measures it against std::exp).
// exp2_8(t) = 2^t for t <= 0, the same way (t = d log2 e given).
inline __m256 exp2_8(__m256 t) {
  t = _mm256_max_ps(t, _mm256_set1_ps(-125.0f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.32764e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.67551e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550713e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.2402212f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.69314697f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}
inline __m256 exp8(__m256 d) { return exp2_8(_mm256_mul_ps(d, _mm256_set1_ps(kLog2e))); }

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The lanes i < n of 8 (0 <= n <= 8) as a mask for maskload.
inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

// sum of exp(z_j) over j < n with z_j >= tau.
inline float kept_mass_sum(const float* z, int64_t n, float tau) {
  float acc = 0.0f;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 vacc = _mm512_setzero_ps();
  const __m512 vtau = _mm512_set1_ps(tau);
  for (; j + 16 <= n; j += 16) {
    const __m512 zj = _mm512_loadu_ps(z + j);
    const __mmask16 kept = _mm512_cmp_ps_mask(zj, vtau, _CMP_GE_OQ);
    vacc = _mm512_mask_add_ps(vacc, kept, vacc, exp16_mass(zj));
  }
  acc = _mm512_reduce_add_ps(vacc);
#elif defined(HK_AVX2)
  __m256 vacc = _mm256_setzero_ps();
  const __m256 vtau = _mm256_set1_ps(tau);
  for (; j + 8 <= n; j += 8) {
    const __m256 zj = _mm256_loadu_ps(z + j);
    vacc = _mm256_add_ps(vacc, _mm256_and_ps(_mm256_cmp_ps(zj, vtau, _CMP_GE_OQ), exp8(zj)));
  }
  acc = hsum8(vacc);
#endif
#pragma omp simd reduction(+ : acc)
  for (int64_t i = j; i < n; ++i) acc += z[i] >= tau ? exp_f(z[i]) : 0.0f;
  return acc;
}

struct RowScan {
  float max;
  bool bad;  // NaN or +inf anywhere, or no finite entry
};

template <int DT>
RowScan scan_row(const void* row, int64_t V) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < V; ++i) m = checked_max(m, ld<DT>(row, i));
  return RowScan{m, max_is_bad(m)};
}

template <int DT>
void fill_z(const void* row, int64_t V, float m, float t, float* z) {
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) z[i] = (ld<DT>(row, i) - m) / t;
}

// --- radix select ---------------------------------------------------------------------------

#if defined(HK_AVX2)
// For each 8-bit lane mask, the lanes set in it, in order (then zeros): AVX2's stand-in for a
// compress, as a permutation of 8 lanes.
struct CompressLut {
  alignas(32) uint32_t lanes[256][8];
  constexpr CompressLut() : lanes() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l)
        if ((m >> l) & 1) lanes[m][n++] = static_cast<uint32_t>(l);
    }
  }
};
constexpr CompressLut kCompressLut{};
#endif

// The order keys of the tokens with z >= floor, into `out` (vector compress with AVX-512; a
// permutation from a table with AVX2).
inline void gather_keys(const float* z, int64_t V, float floor, std::vector<uint32_t>& out) {
  out.resize(static_cast<size_t>(V) + 16);  // room for a full vector store past the last key
  uint32_t* dst = out.data();
  size_t n = 0;
  int64_t i = 0;
#if defined(__AVX512F__)
  // Compress in a register, then store: Zen 4's compress-to-memory form is microcoded and slow.
  const __m512 vfloor = _mm512_set1_ps(floor);
  const __m512i vabs = _mm512_set1_epi32(0x7fffffff);
  for (; i + 16 <= V; i += 16) {
    const __m512 zi = _mm512_loadu_ps(z + i);
    const __mmask16 hit = _mm512_cmp_ps_mask(zi, vfloor, _CMP_GE_OQ);
    const __m512i key = _mm512_maskz_compress_epi32(hit, _mm512_and_si512(_mm512_castps_si512(zi), vabs));
    _mm512_storeu_si512(dst + n, key);
    n += static_cast<size_t>(__builtin_popcount(hit));
  }
#elif defined(HK_AVX2)
  const __m256 vfloor = _mm256_set1_ps(floor);
  const __m256i vabs = _mm256_set1_epi32(0x7fffffff);
  for (; i + 8 <= V; i += 8) {
    const __m256 zi = _mm256_loadu_ps(z + i);
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(zi, vfloor, _CMP_GE_OQ));
    const __m256i key = _mm256_and_si256(_mm256_castps_si256(zi), vabs);
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompressLut.lanes[hit]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + n), _mm256_permutevar8x32_epi32(key, perm));
    n += static_cast<size_t>(__builtin_popcount(static_cast<unsigned>(hit)));
  }
#endif
  for (; i < V; ++i)
    if (z[i] >= floor) dst[n++] = order_key(z[i]);
  out.resize(n);
}

// One radix level over the candidate keys: bucket counts, or (kByMass) bucket exp-masses. Each
// chunk's buckets and masses are computed in vector form, then scattered into kLanes
// interleaved histograms (neighbouring tokens often share a bucket, and a single histogram
// would chain every add through store-to-load forwarding), which are then summed.
template <bool kByMass>
void radix_histogram(int level, const std::vector<uint32_t>& keys, Scratch& s) {
  constexpr int kLanes = Scratch::kLanes;
  const int nb = radix_buckets(level);
  for (int l = 0; l < kLanes; ++l) {
    if (kByMass) std::fill(s.mass_lanes[l], s.mass_lanes[l] + nb, 0.0);
    if (!kByMass) std::fill(s.count_lanes[l], s.count_lanes[l] + nb, 0u);
  }
  const int64_t total = static_cast<int64_t>(keys.size());
  for (int64_t base = 0; base < total; base += kChunk) {
    const int64_t n = std::min(kChunk, total - base);
    const uint32_t* kc = keys.data() + base;
    uint32_t bucket[kChunk];
    float e[kChunk];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      bucket[j] = radix_bucket(kc[j], level);
      if (kByMass) e[j] = exp_f(key_value(kc[j]));
    }
    for (int64_t j = 0; j < n; ++j) {
      if (kByMass) {
        s.mass_lanes[j % kLanes][bucket[j]] += static_cast<double>(e[j]);
      } else {
        s.count_lanes[j % kLanes][bucket[j]] += 1;
      }
    }
  }
  for (int b = 0; b < nb; ++b) {
    s.mass[b] = 0.0;
    s.count[b] = 0;
    for (int l = 0; l < kLanes; ++l) {
      if (kByMass) s.mass[b] += s.mass_lanes[l][b];
      if (!kByMass) s.count[b] += s.count_lanes[l][b];
    }
  }
}

// Walks the buckets from the largest z down to the first where the running count reaches
// `*need` (count mode) or the running mass reaches `target` (mass mode); returns the bucket, or
// -1 when none does, and leaves in `*need` / `*before` what the buckets above it held.
template <bool kByMass>
int radix_walk(int level, const Scratch& s, int64_t* need, double* before, float target) {
  const int nb = radix_buckets(level);
  for (int b = 0; b < nb; ++b) {
    if (kByMass) {
      if (mass_reaches(*before + s.mass[b], target)) return b;
      *before += s.mass[b];
    } else {
      if (s.count[b] >= *need) return b;
      *need -= s.count[b];
    }
  }
  return -1;
}

// Over the candidates in s.keys, which must be the top of the row (every token with a larger z
// is a candidate): the z at which, walking them from the largest down, the running count first
// reaches `need` (kByMass false) or the running exp-mass, added to `before`, first reaches
// `target` (kByMass true). -inf when it never does (rounding; the reference then keeps the whole
// set). Consumes s.keys.
template <bool kByMass>
float radix_select(Scratch& s, int64_t need, double before, float target) {
  uint32_t prefix = 0;
  for (int level = 0; level < kRadixLevels; ++level) {
    radix_histogram<kByMass>(level, s.keys, s);
    const int b = radix_walk<kByMass>(level, s, &need, &before, target);
    if (b < 0) return -kInf;
    prefix |= static_cast<uint32_t>(b) << radix_shift(level);
    if (level + 1 < kRadixLevels) {
      const auto end = std::remove_if(s.keys.begin(), s.keys.end(), [&](uint32_t key) {
        return !radix_match(key, prefix, level + 1);
      });
      s.keys.erase(end, s.keys.end());
    }
  }
  return key_value(prefix);
}

// top-k by radix select over the whole row (for k too large for the chunk bound).
float top_k_by_radix(const float* z, int64_t V, int64_t k, Scratch& s) {
  gather_keys(z, V, -kInf, s.keys);
  return radix_select<false>(s, k, 0.0, 0.0f);
}

// top-p over the tokens with z >= floor (floor = tau_k): the reference's target is top_p times
// the total mass, summed in double. Only tokens with z >= L can be in the kept set, for
//   L = log((1 - top_p) * total / V):
// the tokens below L hold less than V e^L <= (1 - top_p) total, so those above hold at least
// the target. They are the only candidates of the radix select (L is lowered by 1e-3 against
// rounding), which keeps it off the bulk of a peaked row. `row_mass`, when given, is that total
// already (scan_chunks', for a row without top-k), and the pass that sums it is skipped.
float top_p_by_radix(const float* z, int64_t V, float floor, float top_p, Scratch& s,
                     const double* row_mass = nullptr) {
  double total = row_mass != nullptr ? *row_mass : 0.0;
  for (int64_t base = 0; row_mass == nullptr && base < V; base += kChunk) {
    const int64_t n = std::min(kChunk, V - base);
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += z[base + j] >= floor ? static_cast<double>(exp_f(z[base + j])) : 0.0;
    total += acc;
  }
  const float target = top_p_target(total, top_p);
  const double bound = std::log((1.0 - static_cast<double>(top_p)) * total / static_cast<double>(V)) - 1e-3;
  // Candidates below the bound would only add mass the walk never reaches; bound < floor is fine.
  const float cut = bound > static_cast<double>(floor) ? static_cast<float>(bound) : floor;
  gather_keys(z, V, cut, s.keys);
  return radix_select<true>(s, 0, 0.0, target);
}

// top-k (and top-p within it) for k well below the number of chunks: the k-th largest chunk
// maximum is a lower bound on tau_k (k chunks reach it, so k tokens do), so only the tokens of
// chunks above it are sorted. The reference's cumsum is then replayed in its own order.
void top_k_by_chunk_bound(const float* z, int64_t V, const Filter& f, Scratch& s, float* tau_k,
                          float* tau_p) {
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  s.vals.resize(static_cast<size_t>(chunks));
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t base = c * kChunk, n = std::min(kChunk, V - base);
    float cmax = -kInf;
#pragma omp simd reduction(max : cmax)
    for (int64_t j = 0; j < n; ++j) cmax = z[base + j] > cmax ? z[base + j] : cmax;
    s.vals[c] = cmax;
  }
  const int64_t k = f.top_k;
  std::nth_element(s.vals.begin(), s.vals.begin() + (k - 1), s.vals.end(), std::greater<float>());
  const float bound = s.vals[k - 1];
  s.vals.clear();
  for (int64_t i = 0; i < V; ++i)
    if (z[i] >= bound) s.vals.push_back(z[i]);
  std::sort(s.vals.begin(), s.vals.end(), std::greater<float>());
  *tau_k = s.vals[k - 1];
  if (!f.top_p_on) return;
  const size_t kept = std::upper_bound(s.vals.begin(), s.vals.end(), *tau_k, std::greater<float>()) - s.vals.begin();
  double cum = 0.0;
  for (size_t j = 0; j < kept; ++j) cum += static_cast<double>(exp_f(s.vals[j]));
  const float target = top_p_target(cum, f.top_p);
  cum = 0.0;
  for (size_t j = 0; j < kept; ++j) {
    cum += static_cast<double>(exp_f(s.vals[j]));
    if (mass_reaches(cum, target)) {
      *tau_p = s.vals[j];
      return;
    }
  }
}

// Whether top-k is taken from the chunk-maximum bound (k well below the number of chunks, the
// partial last chunk counted) rather than by a select over the whole row: the one predicate of
// kept_threshold and direct_row, so both paths of a row agree on it.
inline bool small_top_k(const Filter& f, int64_t V) {
  return f.top_k_on && f.top_k * 4 <= (V + kChunk - 1) / kChunk;
}

// max(tau_k, tau_p, tau_m): the kept set is z >= tau (see filter_threshold in the reference).
// `row_mass`: the softmax mass of the whole row when already known (rows without top-k).
float kept_threshold(const float* z, int64_t V, const Filter& f, Scratch& s, const double* row_mass = nullptr) {
  float tau_k = -kInf, tau_p = -kInf;
  if (small_top_k(f, V)) {
    top_k_by_chunk_bound(z, V, f, s, &tau_k, &tau_p);
  } else {
    if (f.top_k_on) tau_k = top_k_by_radix(z, V, f.top_k, s);
    if (f.top_p_on) tau_p = top_p_by_radix(z, V, tau_k, f.top_p, s, f.top_k_on ? nullptr : row_mass);
  }
  return std::max(std::max(tau_k, tau_p), f.tau_m);
}

// The Philox words of the chunk of tokens starting at `base` (a multiple of kChunk), 16 blocks
// in vector form.
inline void chunk_words(uint64_t seed, uint32_t step, uint32_t stream, int64_t base, uint32_t* words) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t block0 = static_cast<uint32_t>(base >> 2);
#pragma omp simd
  for (int j = 0; j < static_cast<int>(kChunk / 4); ++j) {
    const PhiloxWords w = philox4x32_10(block0 + j, step, stream, 0u, k0, k1);
    words[4 * j] = w.w[0];
    words[4 * j + 1] = w.w[1];
    words[4 * j + 2] = w.w[2];
    words[4 * j + 3] = w.w[3];
  }
}

// --- the draw -----------------------------------------------------------------------------

struct Draw {
  int64_t token;  // argmax of z + G over the kept set (-1 when not drawn)
  double mass;    // sum of exp(z) over the kept set
};

// Step 4 over z: the kept set's mass and, when `draw`, the Gumbel-max token. Exact pruning: a
// chunk is skipped when its largest z plus the largest noise it could get cannot beat the best
// score so far (strictly, so the first index still wins ties). The noise bound is first the
// global one, then, once the chunk's Philox words exist, the noise of its largest word (the map
// word -> noise is monotone up to rounding, which kGumbelSlack covers).
Draw mass_and_draw(const float* z, int64_t V, float tau, bool draw, uint64_t seed, uint32_t step) {
  constexpr float kGumbelSlack = 1e-3f;
  Draw d{-1, 0.0};
  float best = -kInf;
  for (int64_t base = 0; base < V; base += kChunk) {
    const int64_t n = std::min(kChunk, V - base);
    const float* zc = z + base;
    float cmax = -kInf;
#pragma omp simd reduction(max : cmax)
    for (int64_t j = 0; j < n; ++j) cmax = zc[j] > cmax ? zc[j] : cmax;
    if (cmax < tau) continue;
    d.mass += kept_mass_sum(zc, n, tau);
    if (!draw || cmax + kGumbelMax < best) continue;

    uint32_t words[kChunk];
    chunk_words(seed, step, kStreamToken, base, words);
    uint32_t wmax = 0;
#pragma omp simd reduction(max : wmax)
    for (int64_t j = 0; j < n; ++j) wmax = words[j] > wmax ? words[j] : wmax;
    if (cmax + (gumbel_from_word(wmax) + kGumbelSlack) < best) continue;

    float score[kChunk];
    float smax = -kInf;
#pragma omp simd reduction(max : smax)
    for (int64_t j = 0; j < n; ++j) {
      score[j] = zc[j] >= tau ? zc[j] + gumbel_from_word(words[j]) : -kInf;
      smax = score[j] > smax ? score[j] : smax;
    }
    if (smax > best) {  // strict: the first index wins a tie, as argmax does
      best = smax;
      int64_t j = 0;
      while (score[j] != smax) ++j;
      d.token = base + j;
    }
  }
  return d;
}

// A greedy row in one pass over the logits: row check, first argmax and the softmax mass, the
// mass kept relative to the running max and rescaled when it grows (online softmax).
struct GreedyScan {
  RowScan scan;
  int64_t token;
  double mass;  // sum of exp(x - max)
};

#if defined(__AVX512F__)
// The fp32 greedy scan in AVX-512, one streaming pass: every lane keeps its own running max, the
// index where it first reached it, and its softmax mass relative to it, rescaled in the rare
// vectors where some lane's max grows. The lanes are combined at the end.
inline GreedyScan greedy_scan_f32(const float* x, int64_t V) {
  constexpr int64_t kPrefetchBytes = 1024;  // a little ahead of the hardware prefetcher (measured)
  const __m512 vinf = _mm512_set1_ps(kInf);
  __m512 vmax = _mm512_set1_ps(-kInf), vacc = _mm512_setzero_ps();
  __m512i varg = _mm512_setzero_si512();  // vector index j of each lane's first maximum
  const int64_t vec_end = V & ~int64_t{15};
  for (int64_t j = 0; j < vec_end; j += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(x + j) + kPrefetchBytes, _MM_HINT_T0);
    __m512 v = _mm512_loadu_ps(x + j);
    // "Not <=" is also true for NaN, so a NaN takes the rare branch, where it counts as +inf:
    // the common path pays nothing for the row check.
    const __mmask16 up = _mm512_cmp_ps_mask(v, vmax, _CMP_NLE_UQ);
    if (up) {
      v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), vinf);
      const __m512 grown = _mm512_max_ps(vmax, v);
      vacc = _mm512_mask_mul_ps(vacc, up, vacc, exp16_mass(_mm512_sub_ps(vmax, grown)));
      vmax = grown;
      varg = _mm512_mask_mov_epi32(varg, up, _mm512_set1_epi32(static_cast<int>(j)));
    }
    vacc = _mm512_add_ps(vacc, exp16_mass(_mm512_sub_ps(v, vmax)));
  }
  alignas(64) float lmax[16], lacc[16];
  alignas(64) int32_t larg[16];
  _mm512_store_ps(lmax, vmax);
  _mm512_store_ps(lacc, vacc);
  _mm512_store_si512(larg, varg);
  float m = -kInf;
  for (int l = 0; l < 16; ++l) m = checked_max(m, lmax[l]);
  for (int64_t j = vec_end; j < V; ++j) m = checked_max(m, x[j]);
  GreedyScan g{RowScan{m, max_is_bad(m)}, -1, 0.0};
  if (g.scan.bad) return g;
  for (int l = 0; l < 16; ++l) {
    if (lmax[l] == -kInf) continue;
    g.mass += static_cast<double>(lacc[l]) * static_cast<double>(exp_f(lmax[l] - m));
    const int64_t i = static_cast<int64_t>(larg[l]) + l;
    if (lmax[l] == m && (g.token < 0 || i < g.token)) g.token = i;
  }
  for (int64_t j = vec_end; j < V; ++j) {
    g.mass += static_cast<double>(exp_f(x[j] - m));
    if (x[j] == m && g.token < 0) g.token = j;
  }
  return g;
}
#endif

#if defined(HK_AVX2)
// The fp32 greedy scan in AVX2: greedy_scan_f32 of AVX-512 with its 16 lanes in two 8-lane halves
// (lane l < 8 of the first, l - 8 of the second), so the lanes combine the same way.
inline GreedyScan greedy_scan_f32(const float* x, int64_t V) {
  constexpr int64_t kPrefetchBytes = 1024;
  const __m256 vinf = _mm256_set1_ps(kInf);
  __m256 vmax0 = _mm256_set1_ps(-kInf), vmax1 = vmax0, vacc0 = _mm256_setzero_ps(), vacc1 = vacc0;
  __m256i varg0 = _mm256_setzero_si256(), varg1 = varg0;
  // The lanes' masses move to double every kFlush logits, so a float lane sums at most 64 terms.
  constexpr int64_t kFlush = 1024;
  __m256d vd[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  const int64_t vec_end = V & ~int64_t{15};
  for (int64_t j = 0; j < vec_end; j += 16) {
    if (j % kFlush == 0 && j > 0) {
      vd[0] = _mm256_add_pd(vd[0], _mm256_cvtps_pd(_mm256_castps256_ps128(vacc0)));
      vd[1] = _mm256_add_pd(vd[1], _mm256_cvtps_pd(_mm256_extractf128_ps(vacc0, 1)));
      vd[2] = _mm256_add_pd(vd[2], _mm256_cvtps_pd(_mm256_castps256_ps128(vacc1)));
      vd[3] = _mm256_add_pd(vd[3], _mm256_cvtps_pd(_mm256_extractf128_ps(vacc1, 1)));
      vacc0 = vacc1 = _mm256_setzero_ps();
    }
    _mm_prefetch(reinterpret_cast<const char*>(x + j) + kPrefetchBytes, _MM_HINT_T0);
    __m256 v0 = _mm256_loadu_ps(x + j), v1 = _mm256_loadu_ps(x + j + 8);
    // "Not <=" is also true for NaN: a NaN takes the rare branch, where it counts as +inf.
    const __m256 up0 = _mm256_cmp_ps(v0, vmax0, _CMP_NLE_UQ), up1 = _mm256_cmp_ps(v1, vmax1, _CMP_NLE_UQ);
    if (_mm256_movemask_ps(_mm256_or_ps(up0, up1))) {
      v0 = _mm256_blendv_ps(v0, vinf, _mm256_cmp_ps(v0, v0, _CMP_UNORD_Q));
      v1 = _mm256_blendv_ps(v1, vinf, _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q));
      const __m256 grown0 = _mm256_max_ps(vmax0, v0), grown1 = _mm256_max_ps(vmax1, v1);
      // Lanes that did not grow multiply by exp8(0) = 1 exactly.
      const __m256 r0 = exp8(_mm256_sub_ps(vmax0, grown0)), r1 = exp8(_mm256_sub_ps(vmax1, grown1));
      vacc0 = _mm256_mul_ps(vacc0, r0);
      vacc1 = _mm256_mul_ps(vacc1, r1);
      vd[0] = _mm256_mul_pd(vd[0], _mm256_cvtps_pd(_mm256_castps256_ps128(r0)));
      vd[1] = _mm256_mul_pd(vd[1], _mm256_cvtps_pd(_mm256_extractf128_ps(r0, 1)));
      vd[2] = _mm256_mul_pd(vd[2], _mm256_cvtps_pd(_mm256_castps256_ps128(r1)));
      vd[3] = _mm256_mul_pd(vd[3], _mm256_cvtps_pd(_mm256_extractf128_ps(r1, 1)));
      vmax0 = grown0;
      vmax1 = grown1;
      const __m256i vj = _mm256_set1_epi32(static_cast<int>(j));
      varg0 = _mm256_blendv_epi8(varg0, vj, _mm256_castps_si256(up0));
      varg1 = _mm256_blendv_epi8(varg1, vj, _mm256_castps_si256(up1));
    }
    vacc0 = _mm256_add_ps(vacc0, exp8(_mm256_sub_ps(v0, vmax0)));
    vacc1 = _mm256_add_ps(vacc1, exp8(_mm256_sub_ps(v1, vmax1)));
  }
  alignas(32) float lmax[16], lf[16];
  alignas(32) double lacc[16];
  alignas(32) int32_t larg[16];
  _mm256_store_ps(lmax, vmax0);
  _mm256_store_ps(lmax + 8, vmax1);
  _mm256_store_ps(lf, vacc0);
  _mm256_store_ps(lf + 8, vacc1);
  for (int q = 0; q < 4; ++q) _mm256_store_pd(lacc + 4 * q, vd[q]);
  for (int l = 0; l < 16; ++l) lacc[l] += static_cast<double>(lf[l]);
  _mm256_store_si256(reinterpret_cast<__m256i*>(larg), varg0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(larg + 8), varg1);
  float m = -kInf;
  for (int l = 0; l < 16; ++l) m = checked_max(m, lmax[l]);
  for (int64_t j = vec_end; j < V; ++j) m = checked_max(m, x[j]);
  GreedyScan g{RowScan{m, max_is_bad(m)}, -1, 0.0};
  if (g.scan.bad) return g;
  for (int l = 0; l < 16; ++l) {
    if (lmax[l] == -kInf) continue;
    g.mass += lacc[l] * static_cast<double>(exp_f(lmax[l] - m));
    const int64_t i = static_cast<int64_t>(larg[l]) + l;
    if (lmax[l] == m && (g.token < 0 || i < g.token)) g.token = i;
  }
  for (int64_t j = vec_end; j < V; ++j) {
    g.mass += static_cast<double>(exp_f(x[j] - m));
    if (x[j] == m && g.token < 0) g.token = j;
  }
  return g;
}
#endif

template <int DT>
GreedyScan greedy_scan(const void* row, int64_t V) {
#if defined(__AVX512F__) || defined(HK_AVX2)
  if constexpr (DT == kFloat32) return greedy_scan_f32(static_cast<const float*>(row), V);
#endif
  constexpr int64_t kSpan = 256;  // logits per online-softmax update, read again from L1
  float m = -kInf;
  double mass = 0.0;
  int64_t arg_base = 0;
  for (int64_t base = 0; base < V; base += kSpan) {
    const int64_t n = std::min(kSpan, V - base);
    float cm = -kInf;
#pragma omp simd reduction(max : cm)
    for (int64_t j = 0; j < n; ++j) cm = checked_max(cm, ld<DT>(row, base + j));
    if (cm > m) {
      mass *= static_cast<double>(exp_f(m - cm));  // m = -inf gives 0: nothing to rescale
      m = cm;
      arg_base = base;  // the first maximum lies in the first span that reached it
    }
    if (max_is_bad(m)) continue;  // nothing finite yet, or a bad row
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += exp_total(ld<DT>(row, base + j) - m);
    mass += acc;
  }
  GreedyScan g{RowScan{m, max_is_bad(m)}, -1, mass};
  if (!g.scan.bad) {
    g.token = arg_base;
    while (ld<DT>(row, g.token) != m) ++g.token;
  }
  return g;
}

// --- the value head ----------------------------------------------------------------------

// out[i * U + u] = <x_i, w_u> for R rows x_i = x + i * xs and U weight rows w_u = w + u * ws, all
// of length n: R * U accumulators in registers, R + U loads per R * U FMAs, each operand read
// once per block. A dot product is compared within TOL, so it may use FMAs. Not inlined, so
// the caller's live values do not crowd the loop's registers.
template <int R, int U>
__attribute__((noinline)) void dot_block(const float* x, int64_t xs, const float* w, int64_t ws, int64_t n,
                                         float* out) {
#if defined(__AVX512F__)
  __m512 acc[R][U];
#pragma GCC unroll 16
  for (int i = 0; i < R * U; ++i) acc[i / U][i % U] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {  // unmasked body: a masked tail would cost every iteration
    __m512 wv[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) wv[u] = _mm512_loadu_ps(w + u * ws + k);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * xs + k);
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_fmadd_ps(xv, wv[u], acc[i][u]);
    }
  }
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1);
    for (int i = 0; i < R; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + i * xs + k);
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, w + u * ws + k), acc[i][u]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R * U; ++i) out[i] = _mm512_reduce_add_ps(acc[i / U][i % U]);
#elif defined(HK_AVX2)
  // Two weight rows at a time (R * 2 accumulators, 2 weight vectors and an x vector fit the 16
  // registers); each out[i * U + u] is summed alike whatever R and U are, so a row's value does
  // not depend on the block it falls in.
  for (int u0 = 0; u0 < U; u0 += 2) {
    constexpr int kU = U < 2 ? U : 2;
    __m256 acc[R][kU];
#pragma GCC unroll 8
    for (int i = 0; i < R * kU; ++i) acc[i / kU][i % kU] = _mm256_setzero_ps();
    const float* wu = w + u0 * ws;
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
      __m256 wv[kU];
#pragma GCC unroll 2
      for (int u = 0; u < kU; ++u) {
        wv[u] = _mm256_loadu_ps(wu + u * ws + k);
        asm("" : "+x"(wv[u]));  // in registers: g++ would fold the loads into every FMA, a load each
      }
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        __m256 xv = _mm256_loadu_ps(x + i * xs + k);
        asm("" : "+x"(xv));
#pragma GCC unroll 2
        for (int u = 0; u < kU; ++u) acc[i][u] = _mm256_fmadd_ps(xv, wv[u], acc[i][u]);
      }
    }
    if (k < n) {
      const __m256i m = lanes_below(n - k);
      for (int i = 0; i < R; ++i) {
        const __m256 xv = _mm256_maskload_ps(x + i * xs + k, m);
        for (int u = 0; u < kU; ++u) acc[i][u] = _mm256_fmadd_ps(xv, _mm256_maskload_ps(wu + u * ws + k, m), acc[i][u]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int u = 0; u < kU; ++u) out[i * U + u0 + u] = hsum8(acc[i][u]);
  }
#else
  for (int i = 0; i < R; ++i) {
    for (int u = 0; u < U; ++u) {
      float acc = 0.0f;
      const float *xi = x + i * xs, *wu = w + u * ws;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < n; ++k) acc += xi[k] * wu[k];
      out[i * U + u] = acc;
    }
  }
#endif
}

constexpr int kHeadRows = 8;  // hidden rows per call of head_values from the launchers

// The head's value for `count` hidden rows, row i after n[i] tokens with budget[i]; out[i].
void head_values(const DecodeStepArgs& a, const void* const* hidden, const int32_t* n, const int32_t* budget,
                 int count, float* out, Scratch& s) {
  const int64_t d = a.d, w = d + 2, R = a.R;
  // Rows 64 bytes off a multiple of 4 KiB apart: rows exactly 4 KiB-periodic (d = 4096 makes
  // them so) fall in the same L1 sets and evict each other.
  const int64_t xs = (w + 15) / 16 * 16 + 16;
  const bool f32 = a.weight_dtype == kFloat32;
  s.hidden.resize(static_cast<size_t>(count * xs + count * R + (f32 ? 0 : R * w)));
  float* x = s.hidden.data();
  float* pre = x + count * xs;  // [count][R] pre-activations
  const float* w1 = static_cast<const float*>(a.w1);
  if (!f32) {  // 16-bit weights: once to float
    float* wf = pre + count * R;
    for (int64_t k = 0; k < R * w; ++k) wf[k] = load_as_float(a.w1, k, a.weight_dtype);
    w1 = wf;
  }
  for (int i = 0; i < count; ++i) {
    float* xi = x + i * xs;
    if (a.hidden_dtype == kFloat32) {
      std::copy_n(static_cast<const float*>(hidden[i]), d, xi);
    } else {
      for (int64_t k = 0; k < d; ++k) xi[k] = load_as_float(hidden[i], k, a.hidden_dtype);
    }
    xi[d] = feature_log1p(n[i]);
    xi[d + 1] = feature_fraction(n[i], budget[i]);
  }
  // Weight rows outside, hidden rows inside: a block of 4 weight rows is read from memory once
  // per call and stays in L1 while the count hidden rows (in L2) pass it.
  for (int64_t r0 = 0; r0 < R;) {
    const int ub = R - r0 >= 4 ? 4 : 1;
    for (int i0 = 0; i0 < count;) {
      float part[16];
      const int rb = count - i0 >= 4 ? 4 : (count - i0 >= 2 ? 2 : 1);
      const float* xb = x + i0 * xs;
      const float* wb = w1 + r0 * w;
      if (rb == 4 && ub == 4) dot_block<4, 4>(xb, xs, wb, w, w, part);
      if (rb == 2 && ub == 4) dot_block<2, 4>(xb, xs, wb, w, w, part);
      if (rb == 1 && ub == 4) dot_block<1, 4>(xb, xs, wb, w, w, part);
      if (rb == 4 && ub == 1) dot_block<4, 1>(xb, xs, wb, w, w, part);
      if (rb == 2 && ub == 1) dot_block<2, 1>(xb, xs, wb, w, w, part);
      if (rb == 1 && ub == 1) dot_block<1, 1>(xb, xs, wb, w, w, part);
      for (int i = 0; i < rb; ++i)
        for (int u = 0; u < ub; ++u) pre[(i0 + i) * R + r0 + u] = part[i * ub + u];
      i0 += rb;
    }
    r0 += ub;
  }
  for (int i = 0; i < count; ++i) {
    float v = 0.0f;
    for (int64_t r = 0; r < R; ++r) v += head_unit(a, r, pre[i * R + r]);
    out[i] = v + head_bias(a);
  }
}

// The head's values of batch rows rows[0 .. count) (count <= kHeadRows) at their current state,
// into values[rows[i]]: one task of a launcher's head pass, the weights read once for the block.
[[maybe_unused]] void head_block(const DecodeStepArgs& a, const int64_t* rows, int count, float* values) {
  const int64_t hsize = a.hidden_dtype == kFloat32 ? 4 : 2;
  const void* hidden[kHeadRows];
  int32_t n[kHeadRows], budget[kHeadRows];
  float out[kHeadRows];
  for (int i = 0; i < count; ++i) {
    const int64_t b = rows[i];
    hidden[i] = static_cast<const char*>(a.hidden) + b * a.hidden_stride * hsize;
    n[i] = a.num_generated[b];
    budget[i] = feature_budget(load_request(a, b));
  }
  head_values(a, hidden, n, budget, count, out, scratch());
  for (int i = 0; i < count; ++i) values[rows[i]] = out[i];
}

// --- one position of one row -------------------------------------------------------------

// Speculative sampling's token at a drafted position (see the verify_step reference): the draft
// when u * q(x) < p(x), else the Gumbel-max draw over the residual max(0, p - q) (p itself when
// that is empty). p_i = exp(z_i - log_mass) over the kept set.
int64_t speculative_choice(const float* z, int64_t V, float tau, float log_mass, const SpecDraft& sd,
                           uint64_t seed, uint32_t step) {
  auto p_of = [&](int64_t i) { return z[i] >= tau ? exp_f(z[i] - log_mass) : 0.0f; };
  const float qx = sd.q != nullptr ? load_as_float(sd.q, sd.draft, sd.q_dtype) : 1.0f;
  const float u = uniform_from_word(philox_word(seed, step, kStreamAccept, 0));
  if (u * qx < p_of(sd.draft)) return sd.draft;
  for (const bool residual : {true, false}) {
    float best = -kInf;
    int64_t token = -1;
    for (int64_t base = 0; base < V; base += kChunk) {
      const int64_t n = std::min(kChunk, V - base);
      uint32_t words[kChunk];
      chunk_words(seed, step, kStreamResidual, base, words);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = base + j;
        const float p = p_of(i);
        float r = p;
        if (residual) {
          r = sd.q != nullptr ? p - load_as_float(sd.q, i, sd.q_dtype) : (i == sd.draft ? 0.0f : p);
          r = r < 0.0f ? 0.0f : r;  // NaN stays NaN and drops out below, as torch.clamp
        }
        if (!(r > 0.0f)) continue;
        const float score = log_f(r) + gumbel_from_word(words[j]);
        if (score > best) best = score, token = i;
      }
    }
    if (token >= 0) return token;
  }
  return sd.draft;  // unreachable: p is positive at the row's maximum
}

// --- filtered rows in two passes over the logits --------------------------------------------
// A top-k and/or top-p row, sampled without writing z for the whole row:
//   1. (scan_chunks) read the logits once: row check, max, each chunk's maximum and, when the
//      top-p set is taken over the whole row, its total mass (online softmax);
//   2. (gather_candidates) read again (from cache) only the chunks whose maximum reaches a bound
//      that every kept token clears, computing z = (x - max) / t on the fly: the candidates;
//   3. the thresholds, the kept set's mass and the Gumbel-max draw on the candidates only, in
//      index order, Philox words made per candidate.
// The bound (chunk_max_bound: the chunk maxima bucketed by z, no sort): top-k, a z that k chunk
// maxima reach (so k tokens do: tau_k is at least that); top-p over the whole row, a z that the
// chunk maxima above it already give the target mass (so tau_p is at least that), or else
// log((1 - top_p) * total / V) (the tokens below it hold less than (1 - top_p) of the total, as
// in top_p_by_radix). Rows whose candidates are too many for this to pay (flat rows), a large
// top-k, and speculative positions take the general path (fill_z and the rest).
constexpr size_t kMaxCandidates = 32768;     // past this the general path is cheaper
constexpr size_t kSortedCandidates = 1024;   // top-p candidates sorted up to this many, else radix-selected

struct Candidates {
  std::vector<int64_t> idx;  // token ids, ascending (buffers never shrink; n are in use)
  std::vector<float> z;      // their scaled logits
  size_t n = 0;
};

Candidates& candidates() {
  static thread_local Candidates c;
  return c;
}

// Row check, max and chunk maxima (into s.vals, one per chunk of kChunk tokens) in one pass; with
// `total`, also the row's softmax mass at temperature t, sum_i exp((x_i - max) / t), by the
// online softmax: each chunk's exps are taken against the running max m (x_i - m <= 0, so every
// term is at most 1) and the sum is rescaled by exp((m_old - m_new) / t) when m grows. The
// rescale is taken in double from exact float differences, so rows whose max grows in every
// chunk (sorted logits) do not accumulate its rounding; a term's argument (x_i - m) / t rounds
// no worse than the reference's z = (x_i - max) / t, since |x_i - m| <= |x_i - max|. The terms
// use exp_total (3e-7): the total, hence the top-p target, is within about 4e-7 relative of the
// reference's, far inside the float-tie allowance (1e-5 of top_p). The kept-set walk itself
// sums exp_f over the sorted candidates, as before. A total too large only makes the candidates
// fall short of the target, and the row then takes the general path, which is exact.
template <int DT>
RowScan scan_chunks(const void* row, int64_t V, Scratch& s, float t = 1.0f, double* total = nullptr) {
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  s.vals.resize(static_cast<size_t>(chunks));
  const double inv_t = 1.0 / static_cast<double>(t);
  const float inv_tf = 1.0f / t;  // a multiply, not the reference's division: within an ulp of its z
  float m = -kInf;
  double sum = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t base = c * kChunk, n = std::min(kChunk, V - base);
#if defined(HK_AVX2)
    if (DT == kFloat32 && n == kChunk) {  // the chunk in 8 registers, read once
      const float* xc = static_cast<const float*>(row) + base;
      __m256 v[8];
      for (int k = 0; k < 8; ++k) v[k] = _mm256_loadu_ps(xc + 8 * k);
      // maxps drops NaNs, so they are looked for apart (checked_max counts a NaN as +inf).
      const __m256 nan = _mm256_or_ps(
          _mm256_or_ps(_mm256_cmp_ps(v[0], v[1], _CMP_UNORD_Q), _mm256_cmp_ps(v[2], v[3], _CMP_UNORD_Q)),
          _mm256_or_ps(_mm256_cmp_ps(v[4], v[5], _CMP_UNORD_Q), _mm256_cmp_ps(v[6], v[7], _CMP_UNORD_Q)));
      const __m256 vm = _mm256_max_ps(_mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3])),
                                      _mm256_max_ps(_mm256_max_ps(v[4], v[5]), _mm256_max_ps(v[6], v[7])));
      const float cm = _mm256_movemask_ps(nan) ? kInf : hmax8(vm);
      s.vals[static_cast<size_t>(c)] = cm;
      if (total == nullptr) {
        m = checked_max(m, cm);
        continue;
      }
      if (cm > m) {
        if (m > -kInf) sum *= std::exp((static_cast<double>(m) - static_cast<double>(cm)) * inv_t);
        m = cm;
      }
      if (max_is_bad(m)) continue;
      // The 64 terms summed in float in 8 lanes of 8 (each lane within 2e-7 relative), then in double.
      // The chunk again from L1 (holding it in registers would spill the exps' constants).
      // One multiply by log2(e) / t: exp2_8's argument rounds once more than exp_total's, which
      // the |d| * 9e-8 of its bound already allows for.
      const __m256 vmf = _mm256_set1_ps(m), vit = _mm256_set1_ps(inv_tf * kLog2e);
      __m256 ea = _mm256_setzero_ps(), eb = ea;
      for (int k = 0; k < 8; k += 2) {
        ea = _mm256_add_ps(ea, exp2_8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xc + 8 * k), vmf), vit)));
        eb = _mm256_add_ps(eb, exp2_8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xc + 8 * k + 8), vmf), vit)));
      }
      const __m256 es = _mm256_add_ps(ea, eb);
      const __m256d ed = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(es)),
                                       _mm256_cvtps_pd(_mm256_extractf128_ps(es, 1)));
      const __m128d eh = _mm_add_pd(_mm256_castpd256_pd128(ed), _mm256_extractf128_pd(ed, 1));
      sum += _mm_cvtsd_f64(_mm_add_sd(eh, _mm_unpackhi_pd(eh, eh)));
      continue;
    }
#endif
    float cm = -kInf;
#pragma omp simd reduction(max : cm)
    for (int64_t j = 0; j < n; ++j) cm = checked_max(cm, ld<DT>(row, base + j));
    s.vals[static_cast<size_t>(c)] = cm;
    if (total == nullptr) {
      m = checked_max(m, cm);
      continue;
    }
    if (cm > m) {
      // The sum so far was taken against m: rescale it to cm (m = -inf: nothing summed yet).
      if (m > -kInf) sum *= std::exp((static_cast<double>(m) - static_cast<double>(cm)) * inv_t);
      m = cm;
    }
    if (max_is_bad(m)) continue;  // nothing finite yet, or a bad row (its total is never used)
    // The exps in float vectors, summed in double as the two-pass sum did (a loop that also
    // widens to double does not vectorise them).
    float e[kChunk];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) e[j] = exp_total((ld<DT>(row, base + j) - m) * inv_tf);
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) acc += static_cast<double>(e[j]);
    sum += acc;
  }
  if (total != nullptr) *total = sum;
  return RowScan{m, max_is_bad(m)};
}

// The candidates z >= bound, in index order, from the chunks whose maximum reaches the bound.
template <int DT>
bool gather_candidates(const void* row, int64_t V, float m, float t, float bound, const Scratch& s,
                       Candidates& c) {
  // Raw buffers with room for a whole chunk past the cap: candidates are written branch-free
  // (every token written, the count advanced by the test), then cut to size.
  if (c.idx.size() < kMaxCandidates + kChunk) {
    c.idx.resize(kMaxCandidates + kChunk);
    c.z.resize(kMaxCandidates + kChunk);
  }
  int64_t* idx = c.idx.data();
  float* zc = c.z.data();
  size_t count = 0;
#if defined(HK_AVX2)
  // A raw-logit pre-test, x >= xb with xb a little below m + bound * t, skips the groups of 8 with
  // no candidate; the tokens it passes are tested on their z, computed as the reference does.
  const double xbd = static_cast<double>(m) + static_cast<double>(bound) * static_cast<double>(t);
  const __m256 vxb = _mm256_set1_ps(static_cast<float>(xbd - (std::fabs(xbd) + std::fabs(static_cast<double>(m))) * 1e-6));
#endif
  for (int64_t ch = 0, base = 0; base < V; ++ch, base += kChunk) {
    const int64_t n = std::min(kChunk, V - base);
    if ((s.vals[static_cast<size_t>(ch)] - m) / t < bound) continue;  // the chunk's max z
#if defined(HK_AVX2)
    if (DT == kFloat32 && n == kChunk) {
      const float* xc = static_cast<const float*>(row) + base;
      for (int64_t g = 0; g < kChunk; g += 8) {
        unsigned hit = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xc + g), vxb, _CMP_GE_OQ)));
        while (hit) {
          const int64_t j = g + __builtin_ctz(hit);
          hit &= hit - 1;
          const float zj = (xc[j] - m) / t;
          idx[count] = base + j;
          zc[count] = zj;
          count += zj >= bound ? 1 : 0;
        }
      }
      if (count > kMaxCandidates) return false;
      continue;
    }
#endif
    float z[kChunk];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = (ld<DT>(row, base + j) - m) / t;
    for (int64_t j = 0; j < n; ++j) {
      idx[count] = base + j;
      zc[count] = z[j];
      count += z[j] >= bound ? 1 : 0;
    }
    if (count > kMaxCandidates) return false;
  }
  c.n = count;
  return true;
}

// tau_p over the sorted (descending) candidate values `vals[0, n)`, the reference's cumsum replayed
// in its own order: the first value whose running mass reaches `target`; -inf when none does.
inline float top_p_over_sorted(const std::vector<float>& vals, size_t n, float target) {
  double cum = 0.0;
  for (size_t j = 0; j < n; ++j) {
    cum += static_cast<double>(exp_f(vals[j]));
    if (mass_reaches(cum, target)) return vals[j];
  }
  return -kInf;
}

// A lower bound on the kept set's z from the chunk maxima s.vals (z_c = (max_c - m) / t), without
// sorting them: the chunk maxima go into buckets of z of width 1/4 (z in (-64, 0], one more bucket
// for the rest), which are walked down from 0 to the first where the chunk maxima so far reach
// `need` in count (kByMass false: k chunks reach the bucket's lower edge, so k tokens do and
// tau_k is at least that) or `target` in exp mass (kByMass true: the tokens at or above the edge
// hold at least as much, so tau_p is at least that). The edge is lowered by 1e-3 against rounding;
// -inf when no bucket of z > -64 does. Any lower bound is exact (direct_row checks that the kept
// set lies above it); a tighter one only gathers fewer candidates.
template <bool kByMass>
float chunk_max_bound(Scratch& s, float m, float t, int64_t need, float target) {
  constexpr int kBuckets = 256;  // of width 1/4; bucket kBuckets holds the rest
  const int64_t chunks = static_cast<int64_t>(s.vals.size());
  std::fill(s.count, s.count + kBuckets + 1, 0u);
  if (kByMass) std::fill(s.mass, s.mass + kBuckets + 1, 0.0);
  for (int64_t base = 0; base < chunks; base += kChunk) {
    const int64_t n = std::min(kChunk, chunks - base);
    const float* v = s.vals.data() + base;
    int32_t bucket[kChunk];
    float e[kChunk];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float z = (v[j] - m) / t;
      const float q = -4.0f * z;
      bucket[j] = q < static_cast<float>(kBuckets) ? static_cast<int32_t>(q) : kBuckets;  // NaN: the rest
      if (kByMass) e[j] = exp_f(z);
    }
    for (int64_t j = 0; j < n; ++j) {
      if (kByMass) s.mass[bucket[j]] += static_cast<double>(e[j]);
      if (!kByMass) s.count[bucket[j]] += 1;
    }
  }
  double cum = 0.0;
  int64_t count = 0;
  for (int b = 0; b < kBuckets; ++b) {
    if (kByMass) cum += s.mass[b];
    if (!kByMass) count += s.count[b];
    if (kByMass ? mass_reaches(cum, target) : count >= need) return -0.25f * static_cast<float>(b + 1) - 1e-3f;
  }
  return -kInf;
}

struct DirectRow {
  bool ok;     // false: take the general path
  float tau;   // the kept set is z >= tau
  Draw d;      // its mass and (when drawn) the token
};

// Steps 3 and 4 of a filtered row from its logits, as kept_threshold and mass_and_draw define
// them (see the section comment); ok = false when the row is not one this path serves.
template <int DT>
DirectRow direct_row(const void* row, int64_t V, float m, float t, double row_mass, const Filter& f, bool draw,
                     uint64_t seed, uint32_t step, Scratch& s) {
  DirectRow out{false, -kInf, Draw{-1, 0.0}};
  const bool small_k = small_top_k(f, V);
  if (f.top_k_on && !small_k) return out;
  Candidates& c = candidates();
  float bound;
  double total = 0.0;
  std::vector<float>& sorted = s.z;  // scratch for the sorted candidate values
  if (small_k) {
    // k chunks reach the bucket edge (chunk_max_bound), so k tokens do: tau_k is at least that.
    bound = chunk_max_bound<false>(s, m, t, f.top_k, 0.0f);
    if (!(bound > -kInf)) {  // the k-th chunk maximum lies below z = -64 (a peaked or cold row): select it
      sorted.assign(s.vals.begin(), s.vals.end());
      std::nth_element(sorted.begin(), sorted.begin() + (f.top_k - 1), sorted.end(), std::greater<float>());
      bound = (sorted[static_cast<size_t>(f.top_k - 1)] - m) / t;
    }
    if (!gather_candidates<DT>(row, V, m, t, bound, s, c)) return out;
  } else {
    total = row_mass;
    // The pivot: a bucket edge v where the chunk maxima at or above it already hold the target
    // mass (chunk_max_bound): the tokens with z >= v hold at least as much, so tau_p >= v. Peaked
    // rows find it near their top; otherwise the bound of top_p_by_radix: log((1 - top_p) *
    // total / V).
    const double b = std::log((1.0 - static_cast<double>(f.top_p)) * total / static_cast<double>(V)) - 1e-3;
    const float pivot = chunk_max_bound<true>(s, m, t, 0, top_p_target(total, f.top_p));
    bound = static_cast<float>(std::max(std::max(b, static_cast<double>(pivot)), static_cast<double>(f.tau_m)));
    if (!(bound > -kInf)) return out;
    if (!gather_candidates<DT>(row, V, m, t, bound, s, c)) return out;
  }
  const size_t n = c.n;
  float tau_k = -kInf, tau_p = -kInf;
  if (!small_k && n > kSortedCandidates) {
    // Many candidates (a flat top): the radix select by mass of top_p_by_radix, over them only.
    s.keys.resize(n);
    for (size_t j = 0; j < n; ++j) s.keys[j] = order_key(c.z[j]);
    tau_p = radix_select<true>(s, 0, 0.0, top_p_target(total, f.top_p));
  } else {
    sorted.assign(c.z.begin(), c.z.begin() + static_cast<std::ptrdiff_t>(n));
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  }
  if (small_k) {
    tau_k = sorted[static_cast<size_t>(f.top_k - 1)];
    if (f.top_p_on) {
      const size_t kept = std::upper_bound(sorted.begin(), sorted.end(), tau_k, std::greater<float>()) - sorted.begin();
      double cum = 0.0;
      for (size_t j = 0; j < kept; ++j) cum += static_cast<double>(exp_f(sorted[j]));
      tau_p = top_p_over_sorted(sorted, kept, top_p_target(cum, f.top_p));
    }
  } else if (n <= kSortedCandidates) {
    tau_p = top_p_over_sorted(sorted, n, top_p_target(total, f.top_p));
  }
  out.tau = std::max(std::max(tau_k, tau_p), f.tau_m);
  if (!(out.tau >= bound)) return out;  // the kept set reaches below the candidates (rounding): general path
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  float best = -kInf;
  for (size_t j = 0; j < n; ++j) {
    const float zj = c.z[j];
    if (!(zj >= out.tau)) continue;
    out.d.mass += static_cast<double>(exp_f(zj));
    if (!draw || zj + kGumbelMax < best) continue;
    const int64_t i = c.idx[j];
    const PhiloxWords w = philox4x32_10(static_cast<uint32_t>(i >> 2), step, kStreamToken, 0u, k0, k1);
    const float score = zj + gumbel_from_word(w.w[i & 3]);
    if (score > best) best = score, out.d.token = i;  // strict: the first index wins a tie
  }
  out.ok = true;
  return out;
}

// Judges one position of one row as decode_step specifies, updating `s`: value, row check,
// exits, then the token (forced, speculative, greedy or drawn) and its log-prob.
// `value` is the head's value at this position (NaN without a head), from head_values;
// `scanned`, when not null, is greedy_scan's result for this (greedy) row, taken earlier.
template <int DT>
Judged judge(const DecodeStepArgs& a, const RowRequest& r, RowState& s, const Position& pos, float value,
             const GreedyScan* scanned) {
  Scratch& scr = scratch();
  const int64_t V = a.V;
  if (s.finish_reason != kNone) return Judged{-1, kNaN, kNaN};
  const bool greedy = r.temperature == 0.0f;
  const void* row = pos.logits;

  // Filtered rows at non-speculative positions scan chunk maxima too, for direct_row.
  const Filter f = row_filter(r, V);
  const bool direct = !greedy && !pos.spec.on && (f.top_k_on || f.top_p_on);
  // Top-p over the whole row (no top-k): its total comes from the first pass, for direct_row or,
  // when that declines the row (a flat top), for the general path.
  const bool whole_row_top_p = direct && f.top_p_on && !f.top_k_on;
  GreedyScan g{RowScan{0.0f, true}, -1, 0.0};
  if (scanned != nullptr) {
    g = *scanned;
  } else if (!pos.force_bad) {
    if (greedy) {
      g = greedy_scan<DT>(row, V);
    } else if (direct) {
      // The top-p total over the whole row (top-p without a small top-k) comes from the same pass.
      g.scan = scan_chunks<DT>(row, V, scr, row_temperature(r), whole_row_top_p ? &g.mass : nullptr);
    } else {
      g.scan = scan_row<DT>(row, V);
    }
  }
  const StepPlan p = plan_step(r, s, g.scan.bad, value);

  int64_t token = -1;
  float logprob = kNaN;
  if (p.emit && greedy) {
    // Every token is kept: log p = (x - max) - log(mass).
    token = p.forcing ? p.forced_token : g.token;
    logprob = (ld<DT>(row, token) - g.scan.max) - log_f(static_cast<float>(g.mass));
  } else if (p.emit) {
    const uint32_t step0 = static_cast<uint32_t>(s.num_generated);
    if (direct) {
      const float t = row_temperature(r);
      const DirectRow dr = direct_row<DT>(row, V, g.scan.max, t, g.mass, f, p.draw, r.seed, step0, scr);
      if (dr.ok) {
        token = p.forcing ? p.forced_token : dr.d.token;
        const float zt = (ld<DT>(row, token) - g.scan.max) / t;
        logprob = zt >= dr.tau ? zt - log_f(static_cast<float>(dr.d.mass)) : -kInf;
        finish_step(r, s, p, token);
        return Judged{token, logprob, value};
      }
    }
    scr.z.resize(static_cast<size_t>(V));
    float* z = scr.z.data();
    fill_z<DT>(row, V, g.scan.max, row_temperature(r), z);
    const float tau = (f.top_k_on || f.top_p_on) ? kept_threshold(z, V, f, scr, whole_row_top_p ? &g.mass : nullptr) : f.tau_m;
    const uint32_t step = static_cast<uint32_t>(s.num_generated);
    const bool speculate = p.draw && pos.spec.on;
    const Draw d = mass_and_draw(z, V, tau, p.draw && !speculate, r.seed, step);
    const float log_mass = log_f(static_cast<float>(d.mass));
    token = p.forcing ? p.forced_token : (speculate ? speculative_choice(z, V, tau, log_mass, pos.spec, r.seed, step) : d.token);
    const float zt = z[token];
    logprob = zt >= tau ? zt - log_mass : -kInf;
  }
  finish_step(r, s, p, token);
  return Judged{p.emit ? token : -1, p.emit ? logprob : kNaN, value};
}

using JudgeFn = Judged (*)(const DecodeStepArgs&, const RowRequest&, RowState&, const Position&, float,
                           const GreedyScan*);
using GreedyScanFn = GreedyScan (*)(const void*, int64_t);

[[maybe_unused]] GreedyScanFn greedy_scan_for(int32_t logits_dtype) {
  if (logits_dtype == kFloat32) return greedy_scan<kFloat32>;
  if (logits_dtype == kBFloat16) return greedy_scan<kBFloat16>;
  if (logits_dtype == kFloat16) return greedy_scan<kFloat16>;
  throw std::invalid_argument("unknown logits dtype code " + std::to_string(logits_dtype));
}

[[maybe_unused]] JudgeFn judge_for(int32_t logits_dtype) {
  if (logits_dtype == kFloat32) return judge<kFloat32>;
  if (logits_dtype == kBFloat16) return judge<kBFloat16>;
  if (logits_dtype == kFloat16) return judge<kFloat16>;
  throw std::invalid_argument("unknown logits dtype code " + std::to_string(logits_dtype));
}

// Runs row(b) for every row on up to `num_threads` threads; the first exception is rethrown
// after the parallel region (it must not leave one).
template <class Row>
void for_each_row(int64_t B, int num_threads, const Row& row) {
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, B)));
  std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    try {
      row(b);
    } catch (...) {
#pragma omp critical(haltkit_row_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

// Step 6, compaction: order-preserving indices of the rows still running, -1 padded.
[[maybe_unused]] void compact_host(const int32_t* finish_reason, int64_t B, int64_t* active_idx, int64_t* num_active) {
  int64_t n = 0;
  for (int64_t b = 0; b < B; ++b)
    if (finish_reason[b] == kNone) active_idx[n++] = b;
  for (int64_t b = n; b < B; ++b) active_idx[b] = -1;
  *num_active = n;
}

}  // namespace
}  // namespace hk

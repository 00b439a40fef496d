// Sampling pieces of a decode step (steps 2 and 4 of the specification): the value head's step
// features, the scaled logits z, the kept-set filters and the radix select that finds their
// thresholds without sorting the row.
#pragma once

#include "math.cuh"
#include "shim.cuh"
#include "termination.cuh"

namespace hk {

// log1p(n) and n / budget, the two features the head reads after the hidden state.
HK_HD float feature_log1p(int32_t n) { return log_f(static_cast<float>(n) + 1.0f); }
HK_HD float feature_fraction(int32_t n, int32_t budget) {
  return static_cast<float>(n) / static_cast<float>(budget);
}

// A running max in which NaN counts as +inf: after a row, max == +-inf is exactly the row check
// (NaN or +inf anywhere, or no finite entry). One vectorisable max instead of a max and a flag.
HK_HD float checked_max(float m, float x) {
  const float v = x != x ? kInf : x;
  return v > m ? v : m;
}
HK_HD bool max_is_bad(float m) { return m == kInf || m == -kInf; }

// z = (x - max) / t with t = 1 for greedy rows, exactly as the reference rounds it (a division,
// not a multiply by 1/t), so kept-set membership and the draw see the reference's z bit for bit.
HK_HD float row_temperature(const RowRequest& r) { return r.temperature > 0.0f ? r.temperature : 1.0f; }

// The kept-set filters of one row (all off for greedy rows; see filter_threshold in the reference).
struct Filter {
  bool top_k_on, top_p_on;
  int32_t top_k;
  float top_p;
  float tau_m;  // log(min_p), -inf when min_p is off
};

HK_HD Filter row_filter(const RowRequest& r, int64_t vocab) {
  Filter f{};
  const bool greedy = r.temperature == 0.0f;
  f.top_k_on = !greedy && r.top_k > 0 && r.top_k < vocab;
  f.top_p_on = !greedy && r.top_p < 1.0f;
  f.top_k = r.top_k;
  f.top_p = r.top_p;
  f.tau_m = (!greedy && r.min_p > 0.0f) ? log_f(r.min_p) : -kInf;
  return f;
}

// --- Radix select over z <= 0 -------------------------------------------------------------
// |z| as bits orders z from the largest (key 0) down, so walking buckets of key bits upwards
// visits the row in descending order. Three levels of 11, 11 and 9 bits resolve a key fully,
// so the last bucket found *is* the threshold value: no sort, ties counted with multiplicity.
constexpr int kRadixLevels = 3;
constexpr int kRadixMaxBuckets = 2048;

HK_HD int radix_shift(int level) { return level == 0 ? 20 : (level == 1 ? 9 : 0); }
HK_HD int radix_buckets(int level) { return level == 2 ? 512 : 2048; }
HK_HD uint32_t order_key(float z) { return float_bits(z) & 0x7fffffffu; }
HK_HD float key_value(uint32_t key) { return -bits_float(key); }
HK_HD uint32_t radix_bucket(uint32_t key, int level) {
  return (key >> radix_shift(level)) & static_cast<uint32_t>(radix_buckets(level) - 1);
}
// Whether `key` lies in the bucket chosen at every level before `level` (`prefix` holds them).
HK_HD bool radix_match(uint32_t key, uint32_t prefix, int level) {
  return level == 0 || (key >> radix_shift(level - 1)) == (prefix >> radix_shift(level - 1));
}

// top-p: the reference's target mass, top_p times the float32 total of the top-k set.
HK_HD float top_p_target(double total_mass, float top_p) {
  return top_p * static_cast<float>(total_mass);
}
// The reference accumulates its cumsum in double and rounds each entry to float32.
HK_HD bool mass_reaches(double cum, float target) { return static_cast<float>(cum) >= target; }

}  // namespace hk

// The macro shim that lets the row logic compile under nvcc (host and device) and under g++.
//
// Everything in csrc/include/haltkit is written against this file only: HK_HD functions, the bit
// casts, and the loads that turn a logits / hidden / weight element of any of the three dtypes
// into float. Arithmetic must give the same bits on the host and on the GPU, so the build turns
// off floating-point contraction (g++ -ffp-contract=off, nvcc -fmad=false) and nothing here
// uses approximate intrinsics.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HK_HD __host__ __device__ __forceinline__
#else
#define HK_HD inline __attribute__((always_inline))
#endif

#if !defined(__CUDA_ARCH__)
#include <cstring>
#endif

namespace hk {

HK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

HK_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

HK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

HK_HD bool is_nan(float x) { return x != x; }

constexpr float kInf = __builtin_huge_valf();
constexpr float kNaN = __builtin_nanf("");

// Element types of logits, hidden states and head weights, as numbered by haltkit/native.py.
enum DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

HK_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Exact IEEE half -> float with integer arithmetic only, so it neither depends on the caller's
// denormal mode (flush-to-zero would lose half subnormals) nor on F16C being present.
HK_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  // Zero or subnormal: mant * 2^-24 is exact, and float(mant) is a normal float.
  const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

// Element i of a row of dtype `dt` (the row pointer is untyped so one kernel serves all dtypes).
HK_HD float load_as_float(const void* row, int64_t i, int32_t dt) {
  if (dt == kFloat32) return static_cast<const float*>(row)[i];
  const uint16_t h = static_cast<const uint16_t*>(row)[i];
  return dt == kBFloat16 ? bf16_to_float(h) : half_to_float(h);
}

}  // namespace hk

// exp and log in float with plain IEEE operations only, so the host (vectorised by g++) and the
// GPU compute the same bits. Both are within about 1 ulp of the correctly rounded result, like
// the vectorised libm torch uses; they are not bit-identical to it (see README: float ties).
#pragma once

#include "shim.cuh"

namespace hk {

// ln 2 split so that n * kLn2Hi is exact for |n| < 2^14.
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kLog2e = 1.44269504088896341f;
// exp(z) is below half the smallest float subnormal for z below this.
constexpr float kExpUnderflow = -103.972084f;

// exp(z) for z <= 88 (including -inf, which gives 0). Branch-free so loops over it vectorise.
HK_HD float exp_f(float z) {
  const float zc = z < kExpUnderflow ? kExpUnderflow : z;
  // Round z * log2(e) to the nearest integer n with the 1.5 * 2^23 shifter (exact for |n| < 2^22).
  const float shifter = 12582912.0f;
  const float t = zc * kLog2e + shifter;
  const int32_t n = static_cast<int32_t>(float_bits(t) - float_bits(shifter));
  const float nf = t - shifter;
  const float r = (zc - nf * kLn2Hi) - nf * kLn2Lo;  // |r| <= ln2 / 2
  // exp(r) = 1 + r + r^2 * P(r), minimax P on [-ln2/2, ln2/2].
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = (p * (r * r) + r) + 1.0f;
  // 2^n in two normal factors, so results down to the subnormal range are formed without an
  // intermediate subnormal.
  const int32_t n1 = n < -100 ? n + 100 : n;
  const float s1 = bits_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = n < -100 ? 7.8886090522e-31f : 1.0f;  // 2^-100
  const float y = (er * s1) * s2;
  return z < kExpUnderflow ? 0.0f : y;
}

// log(x) for x >= 0 (0 gives -inf; subnormals are handled). Branch-free.
HK_HD float log_f(float x) {
  const bool tiny = x < 1.17549435e-38f;  // subnormal: scale by 2^23 first
  const float xs = tiny ? x * 8388608.0f : x;
  const uint32_t u = float_bits(xs);
  int32_t e = static_cast<int32_t>(u >> 23) - 127 - (tiny ? 23 : 0);
  float m = bits_float((u & 0x007fffffu) | 0x3f800000u);  // mantissa in [1, 2)
  const bool hi = m > 1.41421356f;                        // centre it on 1: [sqrt(1/2), sqrt(2))
  m = hi ? m * 0.5f : m;
  e += hi ? 1 : 0;
  const float f = m - 1.0f;  // exact
  const float f2 = f * f;
  // log(1 + f) = f - f^2 / 2 + f^3 * P(f), minimax P on [sqrt(1/2) - 1, sqrt(2) - 1].
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float ef = static_cast<float>(e);
  float y = (f * f2) * p + ef * kLn2Lo;
  y = y - 0.5f * f2;
  y = (f + y) + ef * kLn2Hi;
  return x == 0.0f ? -kInf : y;
}

}  // namespace hk

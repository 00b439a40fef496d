// Philox4x32-10 and the uniform / Gumbel maps, bit for bit as python/haltkit/reference/philox.py.
//
// Counter layout (see that file): c0 = token index / 4 (word token index % 4 of the block),
// c1 = step, c2 = stream, c3 = 0; key = the request's 64-bit seed (low word, high word).
#pragma once

#include "math.cuh"
#include "shim.cuh"

namespace hk {

constexpr uint32_t kStreamToken = 0;     // Gumbel noise of a token draw
constexpr uint32_t kStreamAccept = 1;    // uniform of a speculative acceptance test
constexpr uint32_t kStreamResidual = 2;  // Gumbel noise of a speculative residual draw

struct PhiloxWords {
  uint32_t w[4];
};

HK_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi32(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mulhi32(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The four words of block `block` (token indices 4*block .. 4*block+3) of a (seed, step, stream).
HK_HD PhiloxWords philox_block(uint64_t seed, uint32_t step, uint32_t stream, uint32_t block) {
  return philox4x32_10(block, step, stream, 0u, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// One word: token index `index` of a (seed, step, stream).
HK_HD uint32_t philox_word(uint64_t seed, uint32_t step, uint32_t stream, uint32_t index) {
  return philox_block(seed, step, stream, index >> 2).w[index & 3u];
}

// Top 23 bits -> (2 * (w >> 9) + 1) / 2^24 in (0, 1); exact in float.
HK_HD float uniform_from_word(uint32_t w) {
  return static_cast<float>(((w >> 9) << 1) | 1u) * 5.9604644775390625e-8f;
}

// -log(-log(u)), in [-2.81, 16.64].
HK_HD float gumbel_from_word(uint32_t w) { return -log_f(-log_f(uniform_from_word(w))); }

// An upper bound on gumbel_from_word over all words (16.6355 rounded up with room for log_f's
// error): a token whose z + kGumbelMax is below the best score so far cannot win the draw.
constexpr float kGumbelMax = 16.7f;

}  // namespace hk

"""Philox4x32-10 and its uniform / Gumbel maps as ``@triton.jit`` helpers.

Bit for bit the generator of :mod:`haltkit.reference.philox` (the words and the uniforms are
integer and exactly-representable arithmetic, so they match exactly on every device; the Gumbel
map goes through the device's ``log``, which may differ from torch's by an ulp). The counter
layout is the reference's:

    c0 = token index // 4   (the word used is token index % 4 of the 4-word block)
    c1 = step               (tokens the sequence generated before this draw)
    c2 = stream             (STREAM_TOKEN, STREAM_ACCEPT, STREAM_RESIDUAL)
    c3 = 0
    key = (seed & 0xFFFFFFFF, seed >> 32)

Every helper is generic over the op that calls it: ``decode_step`` draws Gumbel noise for a
contiguous tile of the vocabulary (:func:`token_words`), ``verify_step`` also needs single words
at arbitrary token indices (:func:`words_at`). Arguments are uint32 unless said otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "philox4x32_10",
    "seed_key",
    "token_words",
    "words_at",
    "uniform_from_words",
    "gumbel_from_words",
    "GUMBEL_MAX",
]

_M0: tl.constexpr = tl.constexpr(0xD2511F53)
_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
_W1: tl.constexpr = tl.constexpr(0xBB67AE85)

#: An upper bound of every value :func:`gumbel_from_words` returns: the largest uniform is
#: 1 - 2**-24 and -log(-log(1 - 2**-24)) = 16.6355...; the margin covers an ulp of ``log``.
#: Kernels use it to skip vocabulary tiles whose best z + noise cannot win a Gumbel-max draw.
GUMBEL_MAX: tl.constexpr = tl.constexpr(16.64)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11): the four output words of counter (c0..c3), key (k0, k1).

    Args:
        c0, c1, c2, c3: uint32 tensors (or scalars) of one broadcastable shape, the counter.
        k0, k1: uint32, the key (see :func:`seed_key`).
    Returns:
        Four uint32 tensors of the counter's shape.
    """
    for r in tl.static_range(10):
        # uint32 arithmetic wraps by design: no overflow checks (the interpreter would add them).
        if r > 0:
            k0 = tl.add(k0, _W0, sanitize_overflow=False)
            k1 = tl.add(k1, _W1, sanitize_overflow=False)
        hi0 = tl.umulhi(c0, _M0)
        lo0 = tl.mul(c0, _M0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, _M1)
        lo1 = tl.mul(c2, _M1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def seed_key(seed):
    """A request's 64-bit seed as the Philox key.

    Args:
        seed: int64 scalar in [0, 2**63).
    Returns:
        (k0, k1): uint32, the low and high words.
    """
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1


@triton.jit
def token_words(k0, k1, step, stream, start, BLOCK: tl.constexpr):
    """The words of token indices ``start .. start + BLOCK - 1``, one Philox call per 4 tokens.

    Args:
        k0, k1: uint32 key from :func:`seed_key`.
        step: int scalar >= 0, the counter word c1.
        stream: int scalar, the counter word c2 (a STREAM_* constant).
        start: int scalar, a multiple of 4 (vocabulary tiles start at multiples of BLOCK).
        BLOCK: constexpr, a multiple of 4.
    Returns:
        [BLOCK] uint32; entry j is word (start + j) % 4 of counter ((start + j) // 4, step, stream, 0).
    """
    QUARTER: tl.constexpr = BLOCK // 4
    c0 = (start // 4 + tl.arange(0, QUARTER)).to(tl.uint32)
    base = tl.full([QUARTER], 0, tl.int32)
    c1 = (base + step).to(tl.uint32)
    c2 = (base + stream).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, base.to(tl.uint32), k0, k1)
    # join(join(r0, r2), join(r1, r3))[q, i, j] is word 2 * i + j of block q, so the row-major
    # flattening is the token order r0 r1 r2 r3 r0 r1 ...
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    return tl.reshape(words, [BLOCK])


@triton.jit
def words_at(k0, k1, step, stream, token):
    """The word of each token index in ``token`` (any shape); 4x the Philox work of :func:`token_words`.

    Args:
        k0, k1: uint32 key from :func:`seed_key`.
        step: int (scalar or broadcastable), the counter word c1.
        stream: int (scalar or broadcastable), the counter word c2.
        token: int32 / int64 tensor of token indices >= 0.
    Returns:
        uint32 tensor of ``token``'s shape.
    """
    t = token.to(tl.uint32)
    base = token * 0
    c1 = (base + step).to(tl.uint32)
    c2 = (base + stream).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(t >> 2, c1, c2, t * 0, k0, k1)
    j = t & 3
    return tl.where(j == 0, r0, tl.where(j == 1, r1, tl.where(j == 2, r2, r3)))


@triton.jit
def uniform_from_words(words):
    """uint32 words -> float32 uniforms ``(2 * (w >> 9) + 1) * 2**-24`` in (0, 1), exactly as the reference."""
    # < 2**24, so the conversion to float32 is exact and the scaling is a power of two.
    return ((words >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def gumbel_from_words(words):
    """uint32 words -> float32 Gumbel(0, 1) noise ``-log(-log(u))``, in [-2.81, GUMBEL_MAX]."""
    return -tl.log(-tl.log(uniform_from_words(words)))

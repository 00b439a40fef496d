"""Philox4x32-10 in plain PyTorch: the counter-based generator every backend reproduces bit for bit.

A random word is a pure function of (key, counter): the key is the request's 64-bit seed, the
counter names what the word is for. haltkit lays the counter out as

    c0 = token index // 4   (the word used is token index % 4 of the 4-word block)
    c1 = step               (tokens the sequence has generated before this draw)
    c2 = stream             (what the draw is for: see the STREAM_* constants)
    c3 = 0

so a draw never depends on the batch a request shares, nor on which backend makes it.
uint32 arithmetic is emulated in int64 (torch has no unsigned multiply-high).
"""

from __future__ import annotations

import torch

__all__ = [
    "philox4x32",
    "random_words",
    "uniform_from_words",
    "gumbel_from_words",
    "STREAM_TOKEN",
    "STREAM_ACCEPT",
    "STREAM_RESIDUAL",
]

#: Gumbel noise of the token draw (decode_step, and the bonus / coupled draws of verify_step).
STREAM_TOKEN = 0
#: Uniform of a speculative acceptance test (one per position: token index 0).
STREAM_ACCEPT = 1
#: Gumbel noise of a speculative residual draw.
STREAM_RESIDUAL = 2

M32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a * b needs 64 unsigned bits, more than int64 holds: split b into 16-bit halves.
    bh, bl = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * bh, a * bl  # each < 2**48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & M32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
    k0: torch.Tensor, k1: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors holding uint32 values.

    All arguments broadcast together; each is an int64 tensor with values in [0, 2**32).

    Returns:
        The four output words, int64 tensors in [0, 2**32).
    """
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    for r in range(PHILOX_ROUNDS):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & M32
            k1 = (k1 + PHILOX_W1) & M32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def random_words(
    seed: torch.Tensor, step: torch.Tensor, stream: int, num: int
) -> torch.Tensor:
    """The words for token indices 0..num-1 of every row.

    Args:
        seed: [B] int64 in [0, 2**63), the Philox key.
        step: [B] int, the step counter c1.
        stream: one of the STREAM_* constants.
        num: how many token indices.

    Returns:
        [B, num] int64 in [0, 2**32).
    """
    seed = seed.to(torch.int64)
    k0 = (seed & M32)[:, None]
    k1 = (seed >> 32)[:, None]
    blocks = torch.arange((num + 3) // 4, dtype=torch.int64, device=seed.device)[None, :]
    c1 = (step.to(torch.int64) & M32)[:, None]
    zero = torch.zeros((), dtype=torch.int64, device=seed.device)
    words = philox4x32(blocks, c1, zero + stream, zero, k0, k1)
    # An explicit width: with no rows, -1 would be ambiguous (an empty batch is a valid step).
    return torch.stack(words, dim=-1).reshape(seed.shape[0], 4 * blocks.shape[1])[:, :num]


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """uint32 words -> float32 uniforms in (0, 1), exactly representable.

    Uses the top 23 bits: u = (2 * (w >> 9) + 1) / 2**24, in [2**-24, 1 - 2**-24], so neither 0
    nor 1 can occur and every backend computes the same float.
    """
    return ((words >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)


def gumbel_from_words(words: torch.Tensor) -> torch.Tensor:
    """uint32 words -> float32 Gumbel(0, 1) noise, ``-log(-log(u))``.

    With 23-bit uniforms the noise lies in [-2.81, 16.6]: a token whose probability is below about
    e^-19 times the top token's can never be drawn (as with any float32 sampler).
    """
    return -torch.log(-torch.log(uniform_from_words(words)))

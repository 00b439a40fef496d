"""Philox4x32-10 against the published known-answer vectors, and the uniform / Gumbel maps."""

import torch

from haltkit.reference.philox import gumbel_from_words, philox4x32, random_words, uniform_from_words

M = 0xFFFFFFFF
# Known-answer vectors of Random123 (kat_vectors, philox4x32_10): counter, key, expected words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_matches_known_answer_vectors():
    for ctr, key, want in KAT:
        t = [torch.tensor([v], dtype=torch.int64) for v in (*ctr, *key)]
        got = tuple(int(w) for w in philox4x32(*t))
        assert got == want, [hex(g) for g in got]


def test_random_words_depend_on_seed_and_step_only():
    seed = torch.tensor([5, 5, 2**40 + 7], dtype=torch.int64)
    step = torch.tensor([3, 3, 3], dtype=torch.int32)
    w = random_words(seed, step, stream=0, num=37)
    assert w.shape == (3, 37) and w.dtype == torch.int64
    assert torch.equal(w[0], w[1])
    assert not torch.equal(w[0], w[2])
    # The row is independent of the batch and of how many tokens are asked for.
    assert torch.equal(random_words(seed[2:], step[2:], 0, 10)[0], w[2, :10])
    assert not torch.equal(random_words(seed, step + 1, 0, 37), w)
    assert not torch.equal(random_words(seed, step, 1, 37), w)


def test_uniforms_are_open_interval_and_gumbel_is_finite():
    words = torch.tensor([0, 1, 511, 512, M - 511, M], dtype=torch.int64)
    u = uniform_from_words(words)
    assert u.dtype == torch.float32
    assert float(u.min()) == 2.0**-24 and float(u.max()) == 1 - 2.0**-24
    assert torch.isfinite(gumbel_from_words(words)).all()

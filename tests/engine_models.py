"""Tiny random-weight causal LMs of each supported family, prompts and heads for the engine tests."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from haltkit import MarginalValueHead, SamplingParams

V = 111  # odd, so nothing lines up with a power of two
PAD = 0


def tiny(family: str, seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int = V) -> nn.Module:
    """A random-weight causal LM of ``family`` small enough to run many steps in milliseconds."""
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":  # layer 0 full, layer 1 sliding: one mask per layer kind
        cfg = transformers.Qwen2Config(use_sliding_window=True, sliding_window=6, max_window_layers=1, **common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=8, **common)
        cls = transformers.Qwen3ForCausalLM
    elif family == "mistral":  # every layer slides over 6 positions, shorter than the sequences
        cfg = transformers.MistralConfig(sliding_window=6, **common)
        cls = transformers.MistralForCausalLM
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                           pad_token_id=PAD)
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def ragged_prompts(B: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [1, 7, 3, 5, 2, 6, 4][:B] if B > 1 else [5]
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lens]


def sampled(B: int) -> list[SamplingParams]:
    return [SamplingParams(temperature=[0.7, 1.0, 1.3][b % 3], top_p=[1.0, 0.9][b % 2], top_k=[0, 20][b % 2],
                           seed=1000 + 17 * b) for b in range(B)]


def countdown_head(d: int, budget: int, start: float = 100.0) -> MarginalValueHead:
    """A head whose value at step n is exactly ``start - n`` (it reads only the budget fraction)."""
    head = MarginalValueHead(d)
    with torch.no_grad():
        head.w1.zero_()
        head.w1[0, -1] = -budget
        head.b1.fill_(start)
    return head


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask with the prompts right-aligned (Hugging Face's batching)."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), PAD)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask

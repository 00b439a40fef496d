"""A tiny random-weight Llama on disk and value heads with known exits, for the vLLM tests."""

from __future__ import annotations

import torch

D_MODEL = 64
#: Prompts of the toy task's shape; the model is random, so only their tokens matter.
PROMPTS = ["Q:1+2<think>", "Q:3+4+5<think>", "Q:9<think>", "Q:12+7<think>", "Q:5+5+5+5<think>",
           "Q:8<think>", "Q:2+2<think>"]
#: Every request of the step-head tests uses this budget, so the head's n / budget feature is n / 32.
BUDGET = 32


def build_tiny_llama(directory: str, seed: int = 0) -> None:
    """A random-weight 2-layer Llama over the toy character vocabulary, with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from haltkit.tokenizer import CharTokenizer

    tok = CharTokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=2,
        # head_dim 32: vLLM's CPU attention has no kernel for 16.
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save(directory)


def step_head(path: str, budget: int = BUDGET):
    """A linear head blind to the hidden state whose value after n tokens is -n - 0.5.

    With patience 1, ``cost_of_time = -k`` exits once k tokens exist (for requests whose
    budget, thinking_budget else max_tokens, is ``budget``).
    """
    from haltkit import MarginalValueHead

    head = MarginalValueHead(D_MODEL)
    with torch.no_grad():
        head.w1.zero_()
        head.w1[0, -1] = -float(budget)  # the n / budget feature
        head.b1.fill_(-0.5)
    head.save(path)
    return head


#: Engine arguments shared by every test engine (fp32: the same numbers as Hugging Face's).
ENGINE_KW = dict(dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=32 << 20)

"""Tiny random-weight causal LMs of each supported family, prompts and heads for the engine tests."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from haltkit import MarginalValueHead, SamplingParams

V = 111  # odd, so nothing lines up with a power of two
PAD = 0


#: Families whose decoding differs from Llama's in one way each (haltkit.runner.FAMILIES and
#: _mask_kinds): name -> (config class, model class, config overrides). Windows of 6 positions
#: are far shorter than the test sequences; the logit transforms are strong, so that a skipped one
#: moves the sampling distribution far.
FAMILY_CONFIGS = {
    # sliding_window alone (no layer_types): every layer slides
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=6)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=6)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(sliding_window=6, num_local_experts=4,
                                                             num_experts_per_tok=2)),
    # a use_sliding_window flag: off keeps every layer full, on (max_window_layers=0) slides all
    "qwen2-window-off": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False, sliding_window=6)),
    "qwen2-window-all": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=6,
                                                                  max_window_layers=0)),
    # logit transforms after the LM head (plus layer_types windows for cohere2 and gemma2)
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=4.0)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=4.0, sliding_window=6,
                                                             layer_types=["sliding_attention", "full_attention"])),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=0.25)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=0.75, sliding_window=6,
                                                          layer_types=["sliding_attention", "full_attention"])),
}


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
    elif family in FAMILY_CONFIGS:
        cfg_name, cls_name, extra = FAMILY_CONFIGS[family]
        cfg = getattr(transformers, cfg_name)(**{**common, **extra})
        cls = getattr(transformers, cls_name)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                           pad_token_id=PAD)
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def hf_generate(model: nn.Module, prompts: list[list[int]], max_new: int, eos: int | None) -> list[list[int]]:
    """Hugging Face greedy generate on left-padded prompts; each row cut after its EOS."""
    ids, mask = left_padded(prompts)
    T = ids.shape[1]
    dev = next(model.parameters()).device
    out = model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new, min_new_tokens=0,
                         do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    rows = []
    for row in out[:, T:].tolist():
        cut = row.index(eos) + 1 if eos is not None and eos in row else len(row)
        rows.append(row[:cut])
    return rows


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


def forward_calls(model: nn.Module) -> list[str]:
    """Record every forward of every submodule of ``model`` (the engine calls the body and the LM
    head, never ``model.forward``); returns the list the names are appended to."""
    calls: list[str] = []
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda *a, name=name: calls.append(name or "model"))
    return calls

"""FlashAttention over the ragged KV cache on a GPU, when the ``flash-attn`` package is installed.

``flash_attn_with_kvcache`` reads exactly the layout of :class:`haltkit.runner.RaggedKVCache`
(slot j = position j, per-row lengths ``cache_seqlens``), so decode attention reads each row's
real entries only, with no mask tensor. The runner switches a model to this attention function
for the duration of its own forward (Hugging Face looks the implementation up by name on every
call), so the user's model is left as it was.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["NAME", "flash_available", "flash_kvcache_attention"]

#: The name the attention function is registered under in Hugging Face's AttentionInterface.
NAME = "haltkit_flash_kvcache"


@functools.cache
def flash_available() -> bool:
    """True when flash-attn imports and a CUDA device is visible (the function is registered)."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, flash_kvcache_attention)
    return True


def flash_kvcache_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    haltkit_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Hugging Face attention-interface function over the ragged cache.

    Args:
        query: [P, H, q, D], the new tokens' queries.
        key, value: [P, Hkv, T + 1, D], the whole cache buffers (new entries already written).
        haltkit_seqlens: [P] int32, valid entries per row after this step's writes; the q
            queries sit at its last q positions (bottom-right causal alignment).
        sliding_window: the layer's window, or None.
    Returns:
        ([P, q, H, D] attention output, None).
    """
    from flash_attn import flash_attn_with_kvcache

    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    out = flash_attn_with_kvcache(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        cache_seqlens=haltkit_seqlens, softmax_scale=scaling, causal=True, window_size=window,
    )
    return out, None

"""A causal LM, its ragged KV cache and its forward pass, as the decode engine drives them.

The cache is laid out as FlashAttention's ``flash_attn_with_kvcache`` and FlashInfer's decode
kernels see it: slot ``j`` of row ``b`` holds position ``j`` of sequence ``b``, and row ``b`` is
valid on ``[0, length[b])``. New entries are written at per-row positions, so ragged prompts need
no padding inside the cache, a rejected speculative draft is rolled back by not advancing
``length``, and dropping a finished sequence is one ``index_select`` over the batch dimension.
The attention mask follows from the positions alone (key ``j`` is visible to a query at position
``p`` iff ``j <= p``, within the sliding window if the model has one).

Model contract (:func:`split_model`): a Hugging Face causal LM is run as its
``base_model`` (whose ``last_hidden_state`` is the final hidden state, after the final norm) plus
its output embeddings (the LM head) and the family's logit transform (:data:`FAMILIES`), so the
value head reads the LM head's input without a second forward pass. The cache goes in as
``cache`` where the forward declares it (transformers >= 5.2x), else as ``past_key_values``.
Any other ``nn.Module`` works if its ``forward`` takes Hugging Face's arguments
(``input_ids, attention_mask, position_ids, past_key_values`` (or ``cache``), ``use_cache,
output_hidden_states``) and returns ``logits`` and ``hidden_states`` whose last entry is the LM
head's input. Families haltkit cannot run exactly are refused up front (:func:`check_family`).
"""

from __future__ import annotations

import copy
import inspect
import threading

import torch
from torch import nn

__all__ = ["RaggedKVCache", "ModelRunner", "split_model", "model_dims", "bucket_size", "cache_kwarg"]


def bucket_size(n: int) -> int:
    """The compiled batch size that holds ``n`` rows: the next power of two."""
    return 1 << max(0, (n - 1).bit_length())


class RaggedKVCache:
    """Per-layer ``[P, H, T, D]`` key/value buffers written at per-row positions.

    Duck-types the part of Hugging Face's ``Cache`` that attention layers call (``update``);
    the engine sets ``write_pos`` ([P, q] int64, the positions of the q tokens being fed) before
    every forward. ``view_len`` limits the keys handed to attention in eager mode (the compiled
    step keeps the full static width so that its shapes never change). Slot ``capacity`` is a
    trash slot: padded positions past a row's end (a short draft in a wide verification pass)
    are written there, never over a real entry, and no real query ever sees it.

    Args:
        num_layers: cache layers (the model's, or fewer for an early-layer draft that shares it).
        batch: P rows.
        capacity: T, the most positions a row can hold (buffers have T + 1 slots).
    """

    def __init__(self, num_layers: int, batch: int, capacity: int) -> None:
        self.num_layers, self.batch, self.capacity = num_layers, batch, capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.write_pos: torch.Tensor | None = None  # set by the runner before every forward
        self.view_len = capacity + 1
        self._index: tuple | None = None  # (write_pos, shape, its expansion): see _scatter_index

    def __len__(self) -> int:
        return self.num_layers

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``[P, H, q, D]`` keys/values at ``write_pos``; return the layer's buffers."""
        if self.keys[layer_idx] is None:  # allocated on the first (eager) forward
            P, H, _, Dk = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(P, H, self.capacity + 1, Dk)
            self.values[layer_idx] = value_states.new_zeros(P, H, self.capacity + 1, value_states.shape[-1])
            if key_states.is_cuda:  # CUDA graphs replay on these very buffers
                torch._dynamo.mark_static_address(self.keys[layer_idx])
                torch._dynamo.mark_static_address(self.values[layer_idx])
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        if torch.compiler.is_compiling():
            # index_put_ rather than scatter_: torch.compile updates the buffers in place for it,
            # where a scatter_ into a graph input costs a copy of the whole cache every step.
            rows = torch.arange(key_states.shape[0], device=key_states.device)[:, None]
            k_buf[rows, :, self.write_pos] = key_states.transpose(1, 2)
            v_buf[rows, :, self.write_pos] = value_states.transpose(1, 2)
            return k_buf[:, :, : self.view_len], v_buf[:, :, : self.view_len]
        # Eager: one scatter_ per buffer with an index built once per forward. The advanced-indexing
        # index_put_ costs ~25 small ops per write (views, permutes, an arange), 60 writes a step:
        # about the whole margin by which an eager step trailed Hugging Face's at batch 1.
        idx = self._scatter_index(key_states)
        k_buf.scatter_(2, idx, key_states)
        v_buf.scatter_(2, idx if value_states.shape == key_states.shape else self._scatter_index(value_states),
                       value_states)
        return k_buf[:, :, : self.view_len], v_buf[:, :, : self.view_len]

    def _scatter_index(self, states: torch.Tensor) -> torch.Tensor:
        """``write_pos`` expanded to ``states``' shape [P, H, q, D] (a view; kept while ``write_pos``
        is the same tensor, so one forward builds it once for all its layers)."""
        key = (self.write_pos, tuple(states.shape))
        if self._index is None or self._index[0] is not key[0] or self._index[1] != key[1]:
            P, H, q, D = states.shape
            self._index = (self.write_pos, key[1], self.write_pos[:, None, :, None].expand(P, H, q, D))
        return self._index[2]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Positions are always passed explicitly, so Hugging Face never needs this.
        return 0

    def select_rows(self, idx: torch.Tensor) -> None:
        """Keep rows ``idx`` ([n] int64), in that order (compaction)."""
        self.keys = [None if k is None else k.index_select(0, idx) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, idx) for v in self.values]
        self.batch = idx.shape[0]

    def copy_rows_into(self, other: "RaggedKVCache", idx: torch.Tensor) -> None:
        """Copy rows ``idx`` ([other.batch] int64) into ``other``'s allocated buffers, in place."""
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for buf, dst in zip(mine, theirs):
                if buf is not None:
                    dst.copy_(buf.index_select(0, idx))


def _flash_available() -> bool:
    from .flash import flash_available

    return flash_available()


def split_model(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(body, lm_head) of a Hugging Face causal LM, or (None, None) for a plain module.

    The body returns ``last_hidden_state`` (the LM head's input, after the final norm).
    """
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(base, nn.Module) and base is not model and isinstance(head, nn.Module):
        return base, head
    return None, None


def model_dims(model: nn.Module) -> tuple[int | None, int | None, int | None]:
    """(vocab size, hidden size, max positions) read from the LM head and config where known."""
    _, head = split_model(model)
    cfg = getattr(model, "config", None)
    vocab = getattr(head, "out_features", None) if head is not None else None
    hidden = getattr(head, "in_features", None) if head is not None else None
    if vocab is None and cfg is not None:
        vocab = getattr(cfg, "vocab_size", None)
    if hidden is None and cfg is not None:
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    max_pos = None
    if cfg is not None:
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return vocab, hidden, max_pos


def _num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    if not isinstance(n, int):
        raise TypeError("the model's config must give num_hidden_layers (or n_layer) so the KV cache can be sized")
    return n


def _layer_list(body: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The body's decoder-layer list: the ModuleList child with one entry per layer."""
    for name, child in body.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == num_layers:
            return name, child
    nested = [n for n, m in body.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    where = f" (they are nested, at {nested[0]!r}, as in OPT)" if nested else ""
    raise TypeError(
        f"early-layer draft: {type(body).__name__} does not hold its {num_layers} decoder layers as a direct "
        f"ModuleList child{where}; early-layer drafts support bodies like Llama's (model.layers) or GPT-2's "
        "(transformer.h). Use a DraftModel or 'ngram' instead"
    )


def truncated_body(model: nn.Module, layers: int) -> nn.Module:
    """The model's body running only its first ``layers`` decoder layers, then its final norm.

    Shares every weight with ``model`` (a shallow copy with a shorter layer list), so an
    early-layer draft costs no memory. Used for self-speculation.

    Raises:
        ValueError: ``layers`` is not in [1, num_hidden_layers).
        TypeError: the model is not a Hugging Face causal LM with a decoder-layer list.
    """
    body, _ = split_model(model)
    if body is None:
        raise TypeError("early-layer drafting needs a Hugging Face causal LM (base_model + output embeddings)")
    n = _num_layers(model)
    if not isinstance(layers, int) or not 1 <= layers < n:
        raise ValueError(f"early-layer draft: layers must be an int in [1, {n}) for a {n}-layer model, got {layers!r}")
    name, full = _layer_list(body, n)
    short = copy.copy(body)
    short._modules = dict(body._modules)
    short._modules[name] = nn.ModuleList(list(full)[:layers])
    # Llama-style bodies loop over layers[: config.num_hidden_layers]; give the copy its own config.
    short.config = copy.copy(body.config)
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(short.config, attr):
            setattr(short.config, attr, layers)
    return short


#: Model type -> what it does differently from a Llama-style decoder, as haltkit runs it (read off
#: transformers' modeling code; sliding windows and non-attention layers are read from the config,
#: see :func:`_mask_kinds`). Keys: ``mul`` / ``div`` / ``softcap`` name the config attribute the LM
#: head's logits are multiplied by, divided by, or soft-capped with (``c * tanh(logits / c)``), in
#: that order; ``refuse`` says why haltkit cannot run the family (with ``when``, a config attribute
#: that must be true for the refusal to apply).
FAMILIES: dict[str, dict[str, str]] = {
    **{t: {"mul": "logit_scale"} for t in ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text")},
    **{t: {"div": "logits_scaling"}
       for t in ("granite", "granitemoe", "granitemoeshared", "granite_swa", "granitemoe_swa")},
    "hyperclovax": {"mul": "logits_scaling"},  # MuP: multiplies where Granite divides
    **{t: {"softcap": "final_logit_softcapping"}
       for t in ("gemma2", "gemma3", "gemma3_text", "gemma3n_text", "gemma4_text", "vaultgemma", "nanochat",
                 "mistral_large4_text", "beam")},
    "bloom": {"refuse": "ALiBi position biases (built from a 2-D padding mask) are not supported"},
    "mpt": {"refuse": "ALiBi position biases are not supported"},
    "falcon": {"refuse": "ALiBi position biases (config.alibi=True) are not supported", "when": "alibi"},
}
#: Config attributes that transform the LM head's logits in some family: a model of a type not in
#: FAMILIES that sets one is refused rather than sampled from the wrong distribution.
_LOGIT_ATTRS = ("logit_scale", "logits_scaling", "final_logit_softcapping", "output_multiplier",
                "lm_head_multiplier")
#: The attention kinds the ragged cache and its masks implement.
_KINDS = ("full_attention", "sliding_attention")


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def check_family(model: nn.Module) -> None:
    """Raise before any forward when haltkit cannot decode ``model`` exactly as Hugging Face does.

    Refused: families in :data:`FAMILIES` with a ``refuse`` entry (ALiBi: bloom, mpt, falcon with
    ``alibi=True``), encoder-decoders, models without attention heads (Mamba, RWKV, xLSTM) or with
    layers of another kind than full or sliding attention (``layer_types``: linear attention,
    convolutions, chunked attention), and unknown families whose config names a logit transform.

    Raises:
        TypeError: naming the model type and what is not supported.
    """
    cfg = _text_config(model)
    if cfg is None:
        return  # a plain module: its forward returns the logits itself
    kind = getattr(cfg, "model_type", "") or type(model).__name__
    fam = FAMILIES.get(kind, {})
    if "refuse" in fam and (("when" not in fam) or getattr(cfg, fam["when"], False)):
        raise TypeError(f"model type {kind!r}: {fam['refuse']} by haltkit.generate")
    if getattr(cfg, "is_encoder_decoder", False):
        raise TypeError(f"model type {kind!r} is an encoder-decoder; haltkit.generate runs decoder-only causal LMs")
    if not any(isinstance(getattr(cfg, a, None), int) for a in ("num_attention_heads", "n_head", "num_heads")):
        raise TypeError(
            f"model type {kind!r} has no attention heads (a recurrent / state-space model such as Mamba or "
            "RWKV?): haltkit.generate needs a KV-cache attention model"
        )
    layer_types = getattr(cfg, "layer_types", None) or ()
    other = sorted(set(layer_types) - set(_KINDS))
    if other:
        raise TypeError(
            f"model type {kind!r} has layers of kind {other} (config.layer_types); haltkit.generate supports "
            f"only {list(_KINDS)} (a KV cache per layer)"
        )
    if not fam:
        named = [a for a in _LOGIT_ATTRS if getattr(cfg, a, None) not in (None, 1, 1.0)]
        if named:
            raise TypeError(
                f"model type {kind!r} sets config.{named[0]}={getattr(cfg, named[0])!r}, a transform of the LM "
                "head's logits that haltkit does not know for this family (haltkit.runner.FAMILIES)"
            )


def logit_transform(model: nn.Module):
    """The family's transform of the LM head's logits (:data:`FAMILIES`), or None.

    Returns a function ``[..., V] -> [..., V]`` (same dtype), applied exactly as the family's
    ``ForCausalLM.forward`` applies it.
    """
    cfg = _text_config(model)
    fam = FAMILIES.get(getattr(cfg, "model_type", None), {}) if cfg is not None else {}
    mul, div, cap = (getattr(cfg, fam[k], None) if k in fam else None for k in ("mul", "div", "softcap"))
    if mul is None and div is None and cap is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if mul is not None:
            logits = logits * mul
        if div is not None:
            logits = logits / div
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def _mask_kinds(config) -> dict[str, int | None]:
    """Attention-mask kind -> sliding window (None = full), per the model's config.

    Families differ only here, all read from the config as their modeling code reads it: a config
    with ``layer_types`` (Qwen2/Qwen3, Gemma 2/3, Cohere 2, ...) takes one mask per layer kind, the
    sliding ones over ``sliding_window``; one without it slides every layer when ``sliding_window``
    is set (Mistral, Mixtral, Phi-3, Starcoder2, Qwen3-MoE), unless ``use_sliding_window`` is false
    (Qwen2-style flags in older configs that keep the window's value).
    """
    if config is None:
        return {"full_attention": None}
    window = getattr(config, "sliding_window", None) or None
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return {k: (window if k == "sliding_attention" else None) for k in set(kinds)}
    return {"full_attention": window}


def cache_kwarg(fn) -> str:
    """The name under which ``fn`` takes the cache: ``cache`` (transformers >= 5.2x, where
    ``past_key_values`` is deprecated), else ``past_key_values``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class ModelRunner:
    """One model and its ragged KV cache: prefill and multi-token forwards at per-row positions.

    Args:
        model: a Hugging Face causal LM (or a module with the same forward contract).
        batch: P rows.
        capacity: T, positions per row.
        layers: run only the first ``layers`` decoder layers (early-layer draft), or None.
        cache: share this cache (its first layers) instead of allocating one.
    """

    #: Set on the pooled runners of :mod:`haltkit.compiled`: forwards run compiled.
    compiled = False

    def __init__(
        self,
        model: nn.Module,
        batch: int,
        capacity: int,
        layers: int | None = None,
        cache: RaggedKVCache | None = None,
    ) -> None:
        self.model = model
        self.body, self.head = split_model(model)
        if layers is not None:
            self.body = truncated_body(model, layers)
        self.num_layers = layers if layers is not None else _num_layers(model)
        self.cache = cache if cache is not None else RaggedKVCache(self.num_layers, batch, capacity)
        self.batch, self.capacity = batch, capacity
        self.kinds = _mask_kinds(_text_config(model))
        self.transform = logit_transform(model) if self.head is not None else None
        self.cache_kw = cache_kwarg(self.body.forward if self.body is not None else model.forward)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.flash = self.device.type == "cuda" and self.body is not None and _flash_available()

    def _mask(self, positions: torch.Tensor, width: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive [P, 1, q, width] masks: key j visible to a query at position p iff j <= p."""
        j = torch.arange(width, device=positions.device)[None, None, None, :]
        p = positions[:, None, :, None]
        lowest = torch.finfo(self.dtype).min
        masks = {}
        for kind, window in self.kinds.items():
            ok = j <= p
            if window is not None:
                ok = ok & (j > p - window)
            masks[kind] = torch.where(ok, 0.0, lowest).to(self.dtype)
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def forward_at(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [P, q, V] and final hidden states [P, q, d] of ``input_ids`` [P, q] fed at
        ``positions`` [P, q] (written into the cache there).

        Positions past the capacity only occur in padding (never in a real token): they are
        written to the trash slot and fed to the model as the last position.
        """
        self.cache.write_pos = positions.clamp(max=self.capacity)
        positions = positions.clamp(max=self.capacity - 1)
        kwargs = {"input_ids": input_ids, "position_ids": positions, self.cache_kw: self.cache, "use_cache": True}
        if self.flash:
            hidden = self._flash_body(kwargs, (self.cache.write_pos[:, -1] + 1).to(torch.int32))
            return self.logits(hidden), hidden
        kwargs["attention_mask"] = self._mask(positions, self.cache.view_len)
        if self.body is not None:
            hidden = self.body(**kwargs).last_hidden_state
            return self.logits(hidden), hidden
        out = self.model(output_hidden_states=True, **kwargs)
        return out.logits, out.hidden_states[-1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states [..., d], then the family's logit transform: [..., V]."""
        logits = self.head(hidden)
        return logits if self.transform is None else self.transform(logits)

    def _flash_body(self, kwargs: dict, seqlens: torch.Tensor) -> torch.Tensor:
        """The body with FlashAttention over the cache (``haltkit.flash``), no mask tensor."""
        from .flash import NAME

        cfg = self.body.config
        if torch.compiler.is_compiling():
            # A traced step (one compiled call at a time, compiled.exclusive): a plain swap,
            # which dynamo traces as it always has.
            before = cfg._attn_implementation
            cfg._attn_implementation = NAME
            try:
                return self.body(attention_mask=None, haltkit_seqlens=seqlens, **kwargs).last_hidden_state
            finally:
                cfg._attn_implementation = before
        with _attn_implementation(cfg, NAME):
            return self.body(attention_mask=None, haltkit_seqlens=seqlens, **kwargs).last_hidden_state

    def forward(
        self, input_ids: torch.Tensor, start: torch.Tensor, view: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``input_ids`` [P, q] at positions ``start[b] + i``; logits [P, q, V], hidden [P, q, d].

        Entries are written into the cache at those positions; lengths are the caller's to move.
        ``view`` is a host-side bound on every position + 1: eager attention reads only that many
        cache slots (the rest would be masked anyway), so sizing it needs no device sync.
        """
        return self.step(logits_and_hidden, input_ids, start, view)

    def step(self, fn, input_ids: torch.Tensor, start: torch.Tensor, view: int, *args):
        """``fn(self, input_ids, positions, *args)``: a forward (``forward_at``) plus whatever
        follows it in the same step (the engine's epilogue); compiled in :mod:`haltkit.compiled`.

        Args:
            fn: a module-level function (compiled runners cache one compiled step per fn and q).
            input_ids: [P, q] int64; start: [P] int64, the first position; view: as :meth:`forward`.
        """
        q = input_ids.shape[1]
        positions = start[:, None] + torch.arange(q, device=start.device)[None, :]
        self.cache.view_len = min(self.capacity + 1, view)
        return fn(self, input_ids, positions, *args)

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed right-padded prompts [P, T] (row b real on [0, lengths[b])) from position 0.

        Returns the logits [P, V] and final hidden state [P, d] at each row's last prompt token.
        The LM head runs on those rows only; prefill always runs eagerly (its shapes vary).
        """
        P, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)[None, :].expand(P, T)
        self.cache.view_len = min(self.capacity + 1, T)
        last = (lengths.to(torch.int64) - 1)[:, None, None]
        if self.body is None:
            logits, hidden = self.forward_at(input_ids, positions)
            return (logits.gather(1, last.expand(P, 1, logits.shape[-1]))[:, 0],
                    hidden.gather(1, last.expand(P, 1, hidden.shape[-1]))[:, 0])
        self.cache.write_pos = positions
        kwargs = {"input_ids": input_ids, "position_ids": positions, self.cache_kw: self.cache, "use_cache": True}
        if self.flash:
            hidden = self._flash_body(kwargs, torch.full((P,), T, dtype=torch.int32, device=input_ids.device))
        else:
            hidden = self.body(attention_mask=self._mask(positions, T), **kwargs).last_hidden_state
        h_last = hidden.gather(1, last.expand(P, 1, hidden.shape[-1]))[:, 0]
        return self.logits(h_last), h_last

    def compact(self, idx: torch.Tensor) -> "ModelRunner":
        """Keep rows ``idx`` ([n] int64), in that order; returns the runner to use from now on."""
        self.cache.select_rows(idx)
        self.batch = idx.shape[0]
        return self


#: config id -> [implementation to restore, runners inside]: concurrent FlashAttention forwards of
#: one model (two threads) share the switch, and the last one out restores the user's setting.
_ATTN_SWITCH: dict[int, list] = {}
_ATTN_LOCK = threading.Lock()


class _attn_implementation:
    """Context manager: ``config._attn_implementation = name`` while any runner of it is inside."""

    def __init__(self, config, name: str) -> None:
        self.config, self.name = config, name

    def __enter__(self) -> None:
        with _ATTN_LOCK:
            entry = _ATTN_SWITCH.setdefault(id(self.config), [self.config._attn_implementation, 0])
            entry[1] += 1
            self.config._attn_implementation = self.name

    def __exit__(self, *exc) -> None:
        with _ATTN_LOCK:
            entry = _ATTN_SWITCH[id(self.config)]
            entry[1] -= 1
            if entry[1] == 0:
                self.config._attn_implementation = entry[0]
                del _ATTN_SWITCH[id(self.config)]


def logits_and_hidden(runner: ModelRunner, input_ids: torch.Tensor, positions: torch.Tensor):
    """The plain step: logits [P, q, V] and final hidden states [P, q, d]."""
    return runner.forward_at(input_ids, positions)

"""The marginal-value head: predicts the value of one more decode step from the hidden state."""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["MarginalValueHead", "HeadWeights", "step_features", "NUM_STEP_FEATURES", "load_value_head"]

#: Step features appended to the hidden state: log1p(tokens so far) and budget fraction used.
NUM_STEP_FEATURES = 2
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FORMAT = "haltkit.MarginalValueHead/1"
#: The safetensors metadata key of what travels with a trained head (see :meth:`MarginalValueHead.exit_defaults`).
META_KEY = "haltkit.head_meta"


class HeadWeights(NamedTuple):
    """The head as the kernels take it (all on one device, one dtype).

    Fields:
        w1: [R, d + 2]; the linear head has R = 1 and its output is ``x @ w1.T + b1``.
        b1: [R].
        w2: [R] for the MLP head (output ``relu(x @ w1.T + b1) @ w2 + b2``), [0] for linear.
        b2: [1] (zero for the linear head).
    """

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @property
    def is_mlp(self) -> bool:
        return self.w2.numel() > 0

    @property
    def d_model(self) -> int:
        return self.w1.shape[1] - NUM_STEP_FEATURES


def step_features(num_generated: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """The two step features the head is conditioned on.

    Args:
        num_generated: [B] int, tokens generated before this step.
        budget: [B] int >= 1, the sequence's budget (thinking budget, else max_new_tokens).

    Returns:
        [B, 2] float32: ``log1p(num_generated)`` and ``num_generated / budget``.
    """
    n = num_generated.to(torch.float32)
    return torch.stack([torch.log1p(n), n / budget.to(torch.float32)], dim=1)


class MarginalValueHead(nn.Module):
    """Maps a final hidden state plus step features to the marginal value of one more step.

    The input is ``x = [h, log1p(n), n / budget]`` (``d_model + 2`` features); the output, one
    float32 scalar per sequence, is in units of final return per step and is compared against the
    request's price of time. ``hidden == 0`` makes a linear head, otherwise a two-layer ReLU MLP
    of width ``hidden``. Arithmetic is float32 whatever the weight dtype.

    Args:
        d_model: hidden size of the model it reads.
        hidden: MLP width r, or 0 for a linear head. Default 0.
        dtype: float32, bfloat16 or float16 weights. Default float32.
        device: where the weights live.

    Example:
        >>> head = MarginalValueHead(d_model=64, hidden=16)
        >>> head(torch.randn(3, 64), torch.tensor([0, 5, 9]), torch.tensor([32, 32, 32])).shape
        torch.Size([3])
    """

    def __init__(
        self,
        d_model: int,
        hidden: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be an int >= 1, got {d_model!r}")
        if not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"hidden must be an int >= 0 (0 = linear), got {hidden!r}")
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.d_model = d_model
        self.hidden = hidden
        width = hidden if hidden > 0 else 1
        fan_in = d_model + NUM_STEP_FEATURES
        self.w1 = nn.Parameter(torch.empty(width, fan_in, dtype=dtype, device=device))
        self.b1 = nn.Parameter(torch.zeros(width, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device))
        self.b2 = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
        with torch.no_grad():
            self.w1.uniform_(-(fan_in**-0.5), fan_in**-0.5)
            if hidden > 0:
                self.w2.uniform_(-(hidden**-0.5), hidden**-0.5)
        #: What travels with a trained head (model identity, exit tokens, operating points, metrics),
        #: or None for a bare head; written by ``haltkit train-head``, read by every entry point.
        self.meta: dict | None = None

    @property
    def is_mlp(self) -> bool:
        return self.hidden > 0

    def weights(self) -> HeadWeights:
        """The parameters as the kernels take them (no copy)."""
        return HeadWeights(self.w1.detach(), self.b1.detach(), self.w2.detach(), self.b2.detach())

    def forward(
        self, hidden_states: torch.Tensor, num_generated: torch.Tensor, budget: torch.Tensor
    ) -> torch.Tensor:
        """Predicted marginal value per sequence.

        Args:
            hidden_states: [B, d_model] float32 | bfloat16 | float16.
            num_generated: [B] int, tokens generated so far.
            budget: [B] int >= 1, thinking budget (else max_new_tokens).

        Returns:
            [B] float32.
        """
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.d_model:
            raise ValueError(
                f"hidden_states must be [B, {self.d_model}], got {list(hidden_states.shape)}"
            )
        x = torch.cat([hidden_states.float(), step_features(num_generated, budget)], dim=1)
        return head_forward(x, HeadWeights(self.w1, self.b1, self.w2, self.b2))

    def extra_repr(self) -> str:
        kind = f"mlp(hidden={self.hidden})" if self.is_mlp else "linear"
        return f"d_model={self.d_model}, {kind}, dtype={self.w1.dtype}"

    def save(self, path: str | os.PathLike) -> None:
        """Write the head to a safetensors file (weights, shape and :attr:`meta` as metadata)."""
        from safetensors.torch import save_file

        meta = {
            "format": _FORMAT,
            "config": json.dumps(
                {"d_model": self.d_model, "hidden": self.hidden, "dtype": str(self.w1.dtype)[6:]}
            ),
        }
        if self.meta is not None:
            meta[META_KEY] = json.dumps(self.meta)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "MarginalValueHead":
        """Read a head written by :meth:`save`.

        Raises:
            ValueError: when the file is not a haltkit value head.
        """
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: not a haltkit value head (format {meta.get('format')!r})")
            cfg = json.loads(meta["config"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        head = cls(cfg["d_model"], cfg["hidden"], dtype=_DTYPES[cfg["dtype"]], device=device)
        head.load_state_dict(tensors)
        head.meta = json.loads(meta[META_KEY]) if META_KEY in meta else None
        return head

    def exit_defaults(self) -> dict:
        """What the head's metadata says about exits, as ``ExitPolicy`` keyword arguments.

        Keys present only where the metadata has them: ``cost_of_time`` and ``patience`` (the
        default operating point), ``exit_tokens``, ``eos_token_ids``, ``thinking_budget``,
        ``max_new_tokens`` (budget + exit tokens + answer tokens). Empty for a bare head. The
        vLLM integration and the CLI fill a request's missing parameters from this.
        """
        m = self.meta or {}
        out: dict = {}
        op = (m.get("operating_points") or {}).get(m.get("default_operating_point") or "")
        if op:
            out["cost_of_time"], out["patience"] = float(op["cost_of_time"]), int(op["patience"])
        conv = m.get("conventions") or {}
        if conv.get("exit_ids"):
            out["exit_tokens"] = tuple(conv["exit_ids"])
        if conv.get("eos_ids"):
            out["eos_token_ids"] = tuple(conv["eos_ids"])
        if m.get("thinking_budget"):
            out["thinking_budget"] = int(m["thinking_budget"])
            out["max_new_tokens"] = out["thinking_budget"] + len(out.get("exit_tokens", ())) + int(
                m.get("max_answer_tokens", 32))
        return out

    def exit_policy(self, **overrides):
        """An :class:`haltkit.ExitPolicy` from :meth:`exit_defaults`; explicit arguments override.

        Example:
            >>> head.exit_policy()                      # the calibrated lambda and patience
            >>> head.exit_policy(cost_of_time=0.02)     # another price, the same patience
        """
        from .params import ExitPolicy

        return ExitPolicy(**{**self.exit_defaults(), **overrides})

    def check_compatible(self, model=None, tokenizer=None) -> None:
        """Refuse a model or tokenizer other than the one the head was trained for.

        Args:
            model: a causal LM (hidden size and vocabulary are compared), or None.
            tokenizer: compared by vocabulary fingerprint when the metadata records one, or None.
        Raises:
            ValueError: naming the field, the head's value and the model's.
        """
        from .runner import model_dims

        if model is not None:
            vocab, hidden, _ = model_dims(model)
            if hidden is not None and hidden != self.d_model:
                raise ValueError(f"value head: it reads hidden states of size {self.d_model} but the model's "
                                 f"final hidden state has size {hidden} (a head of another model)")
            want = ((self.meta or {}).get("model") or {}).get("vocab_size")
            if want is not None and vocab is not None and vocab != want:
                raise ValueError(f"value head: trained for a vocabulary of {want} tokens, the model has {vocab} "
                                 "(a head of another model)")
        want_tok = ((self.meta or {}).get("model") or {}).get("tokenizer")
        if tokenizer is not None and want_tok is not None:
            from .train.conventions import tokenizer_fingerprint

            got = tokenizer_fingerprint(tokenizer)
            if got != want_tok:
                raise ValueError(f"value head: trained with tokenizer {want_tok}, got tokenizer {got} (another "
                                 "vocabulary: its exit and EOS token ids would mean other tokens)")


def load_value_head(path: str | os.PathLike, model=None, tokenizer=None, device: torch.device | str = "cpu",
                    allow_unfit: bool = False) -> MarginalValueHead:
    """Load a head and check it against the model and tokenizer it will be used with.

    Args:
        path: a file written by :meth:`MarginalValueHead.save` (``haltkit train-head``'s output).
        model, tokenizer: what the head will read (see :meth:`MarginalValueHead.check_compatible`).
        device: where the weights go.
        allow_unfit: load a head that ``train-head``'s quality gate marked unfit.
    Raises:
        ValueError: not a head, a head marked unfit, or another model / tokenizer.
    """
    head = MarginalValueHead.load(path, device=device)
    fit = (head.meta or {}).get("fit")
    if fit is not None and not fit.get("ok", True) and not allow_unfit:
        raise ValueError(f"{path}: the head is marked unfit by train-head's quality gate "
                         f"({'; '.join(fit.get('reasons', []))}); pass allow_unfit=True to use it anyway")
    head.check_compatible(model, tokenizer)
    return head


def head_forward(x: torch.Tensor, w: HeadWeights) -> torch.Tensor:
    """The head on ready-made features: x [B, d + 2] float32 -> [B] float32 (fp32 arithmetic)."""
    h = x @ w.w1.float().T + w.b1.float()
    if w.w2.numel() == 0:
        return h[:, 0]
    return torch.relu(h) @ w.w2.float() + w.b2.float()[0]

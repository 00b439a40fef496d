"""haltkit: fused decode-step kernels and a marginal-value head for early-exit decoding."""

from .backends import backends
from .drafts import DraftModel, EarlyLayerDraft, PromptLookup
from .engine import generate
from .models import ToyModels, load_toy
from .ops import decode_step, sampling_probs, verify_step, verify_step_flat
from .params import DEFAULT_PATIENCE, ExitPolicy, RequestBatch, SamplingParams, pack_requests
from .result import GenerateResult
from .speculative import VerifyOutput
from .state import DecodeState, Reason, StepOutput
from .value_head import HeadWeights, MarginalValueHead, load_value_head

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PATIENCE",
    "DecodeState",
    "DraftModel",
    "EarlyLayerDraft",
    "ExitPolicy",
    "GenerateResult",
    "HeadWeights",
    "MarginalValueHead",
    "load_value_head",
    "PromptLookup",
    "Reason",
    "RequestBatch",
    "SamplingParams",
    "StepOutput",
    "ToyModels",
    "VerifyOutput",
    "backends",
    "decode_step",
    "generate",
    "load_toy",
    "pack_requests",
    "sampling_probs",
    "verify_step",
    "verify_step_flat",
]

"""haltkit: fused decode-step kernels and a marginal-value head for early-exit decoding."""

from .backends import backends
from .ops import decode_step
from .params import ExitPolicy, RequestBatch, SamplingParams, pack_requests
from .state import DecodeState, Reason, StepOutput
from .value_head import HeadWeights, MarginalValueHead

__version__ = "0.1.0"

__all__ = [
    "DecodeState",
    "ExitPolicy",
    "HeadWeights",
    "MarginalValueHead",
    "Reason",
    "RequestBatch",
    "SamplingParams",
    "StepOutput",
    "backends",
    "decode_step",
    "pack_requests",
]

"""Triton kernels, installed as ``haltkit.kernels``: one module per op, same signatures as the reference."""

from .decode_step import decode_step
from .exit_rules import exit_rules
from .verify_step import verify_step

__all__ = ["decode_step", "verify_step", "exit_rules"]

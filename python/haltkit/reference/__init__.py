"""Pure-PyTorch reference implementations: the executable specification of every op."""

from .decode_step import decode_step
from .exit_rules import exit_rules
from .verify_step import verify_step

__all__ = ["decode_step", "verify_step", "exit_rules"]

"""Triton kernels, installed as ``haltkit.kernels``: one module per op, same signatures as the reference."""

if __name__ != "haltkit.kernels":
    # This folder lies at the checkout root, so any `python -m ...` started there (vLLM's
    # model-inspection subprocess, `python -m pytest`) can find it as the top-level package
    # `kernels`: the name of Hugging Face's kernel-hub package, which transformers imports to
    # probe for. Our modules only work inside haltkit, so the name goes back to its owner.
    from ._shadow import yield_top_level_name

    yield_top_level_name(globals())
else:
    from .decode_step import decode_step
    from .exit_rules import exit_rules
    from .verify_step import verify_step

    __all__ = ["decode_step", "verify_step", "exit_rules"]

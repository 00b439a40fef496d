"""haltkit packaging: the Python package lives in python/haltkit, the Triton kernels in kernels/."""

from setuptools import setup

setup(
    name="haltkit",
    version="0.1.0",
    description="Fused decode-step kernels and a marginal-value head for early-exit LLM decoding",
    python_requires=">=3.10",
    package_dir={"haltkit": "python/haltkit", "haltkit.kernels": "kernels"},
    packages=["haltkit", "haltkit.reference", "haltkit.kernels", "haltkit.train", "haltkit.models", "haltkit.vllm"],
    # The toy reasoning models (target, draft, value head) ship inside the package.
    package_data={"haltkit.models": ["toy/meta.json", "toy/head.safetensors", "toy/target/*", "toy/draft/*"]},
    # torch is a floor only, so a GPU user keeps the build they already have. transformers runs
    # haltkit.generate's models and the demo (`pip install -e . && haltkit demo` must work).
    install_requires=["torch>=2.4", "numpy", "safetensors", "transformers>=4.56"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=8", "pytest-xdist", "hypothesis", "triton>=3.0", "numpy", "scipy", "transformers>=4.56"],
        # The toy models, train-toy and train-head run on Hugging Face Llama; bench plots need matplotlib.
        "toy": ["transformers>=4.56"],
        "bench": ["transformers>=4.56", "matplotlib"],
    },
    entry_points={"console_scripts": ["haltkit=haltkit.cli:main"]},
)

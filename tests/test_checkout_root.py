"""The checkout root is a working directory users run from: nothing there may shadow another package.

``kernels/`` (installed as ``haltkit.kernels``) lies at the root, and ``python -m`` puts the working
directory first on ``sys.path``. vLLM inspects models in a ``python -m`` subprocess that inherits the
working directory, and transformers imports a top-level ``kernels`` to probe for Hugging Face's
kernel hub: the probe must see "not installed" (or the real hub package), never haltkit's kernels.
Each check runs in a fresh interpreter started in the checkout root, as those subprocesses are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_in_root(code: str, extra_path: str | None = None) -> str:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    # `-c` puts the working directory first on sys.path, exactly as `python -m` does.
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def test_top_level_kernels_from_the_checkout_root_is_never_haltkits():
    # What `import kernels` must give: the installed package of that name (recent transformers
    # releases depend on Hugging Face's), else a module that reads as absent.
    out = _run_in_root("""
        import os, sys
        from importlib.machinery import PathFinder
        assert sys.path[0] == "", sys.path[:2]
        installed = PathFinder.find_spec("kernels", [p for p in sys.path[1:] if os.path.realpath(p) != os.getcwd()])
        import kernels
        if installed is None:
            print(kernels.__file__, list(kernels.__path__), hasattr(kernels, "decode_step"))
            try:
                import kernels.decode_step
            except ModuleNotFoundError:
                print("no submodule")
            from transformers.utils import import_utils
            print("hub kernels available:", import_utils.is_kernels_available())
        else:
            print("installed" if kernels.__file__ == installed.origin else kernels.__file__)
        from transformers import LlamaConfig, LlamaForCausalLM  # the import that vLLM's inspection failed on
        import haltkit.kernels
        print("haltkit.kernels:", haltkit.kernels.decode_step.__module__)
    """)
    lines = out.splitlines()
    if lines[0] != "installed":
        assert lines[:3] == ["None [] False", "no submodule", "hub kernels available: False"]
    assert lines[-1] == "haltkit.kernels: haltkit.kernels.decode_step"


def test_an_installed_kernels_package_keeps_its_name(tmp_path):
    # Stands in for Hugging Face's `kernels` installed in site-packages, behind the checkout root.
    pkg = tmp_path / "kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '9.9.9'\nMARK = 'hub'\n")
    (pkg / "layer.py").write_text("X = 1\n")
    out = _run_in_root("""
        import kernels, kernels.layer
        print(kernels.MARK, kernels.__version__, kernels.layer.X)
    """, extra_path=str(tmp_path))
    assert out.split() == ["hub", "9.9.9", "1"]

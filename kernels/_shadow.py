"""What the checkout's ``kernels/`` folder does when it is imported under the wrong name.

See ``kernels/__init__.py``: run from the checkout root, ``import kernels`` finds this folder before
any installed package of that name. Nothing here may import the rest of haltkit.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import PathFinder


def yield_top_level_name(namespace: dict) -> None:
    """Make ``import kernels`` mean what it would without the checkout root on ``sys.path``.

    When another ``kernels`` package is installed (Hugging Face's kernel hub), it is loaded and put
    in this module's place in ``sys.modules``, which is what the ``import`` statement then returns.
    Otherwise the module becomes what importers read as "not installed": a package with no file
    and no submodules (transformers' availability probe treats ``__file__ is None`` so).

    Args:
        namespace: the ``globals()`` of the package being imported as a top-level name.
    """
    name = namespace["__name__"]
    root = os.path.dirname(os.path.dirname(os.path.realpath(namespace["__file__"])))
    elsewhere = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = PathFinder.find_spec(name, elsewhere)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)  # on failure the import machinery drops sys.modules[name]
        return
    namespace["__file__"] = None
    namespace["__path__"][:] = []  # `import kernels.decode_step` fails as for an absent package

"""The repository's ``kernels/`` and ``passes/`` folders are ``peftc.kernels`` and ``peftc.passes``. A
Python started in the repository root (``python -m pytest``, ``python -c``, ``python -m
benchmarks...``) also finds them as top-level ``kernels`` and ``passes``: names of PyPI packages
(Hugging Face's ``kernels`` comes with transformers, which imports it when installed). Their
``__init__`` calls ``hand_over`` in that case, so the import gets the installed package, or, when
none is, an empty namespace-like module (what a folder without ``__init__`` would give: availability
checks such as transformers' read it as not installed).

Loaded by file path and importing nothing of peftc: it runs inside whatever import reached it
(transformers' own, halfway through).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

__all__ = ["hand_over"]


def hand_over(name: str, init_file: str) -> None:
    """Makes ``import name`` give the first ``name`` on ``sys.path`` outside the repository root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:  # none installed: an empty namespace-like module, which
        # availability checks (transformers' _is_package_available: no __file__, no version) read as absent
        module = types.ModuleType(name, f"No package {name!r} is installed; the repository's {name}/ folder is "
                                        f"peftc.{name}, not a top-level package.")
        module.__file__, module.__path__ = None, []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns what sys.modules holds after this __init__
    spec.loader.exec_module(module)

"""peftc.passes: rewrite and optimization passes over fx GraphModules, and their pipeline.

Every module of ``methods/`` and ``optimize/`` is imported here, found by listing them: importing a
method or optimization file registers it (with its phase), so a new one is one new file.
"""

import importlib
import pkgutil

from peftc.passes.pipeline import (
    PassContext,
    PassResult,
    Plan,
    build,
    register_method,
    register_optimization,
    run_pipeline,
)

for _sub in ("methods", "optimize"):
    _pkg = importlib.import_module(f"{__name__}.{_sub}")
    for _info in pkgutil.iter_modules(_pkg.__path__):
        importlib.import_module(f"{_pkg.__name__}.{_info.name}")

__all__ = ["PassContext", "PassResult", "Plan", "build", "run_pipeline", "register_method", "register_optimization"]

"""peftc.passes: rewrite and optimization passes over fx GraphModules, and their pipeline.

Every module of ``methods/`` and ``optimize/`` is imported here, found by listing them: importing a
method or optimization file registers it (with its phase), so a new one is one new file.
"""

if __name__ == "passes":  # found as top-level "passes" from the repository root: not ours (peftc/toplevel.py)
    import os as _os
    import runpy as _runpy

    _runpy.run_path(_os.path.join(_os.path.dirname(__file__), _os.pardir, "peftc", "toplevel.py"))["hand_over"](
        __name__, __file__)
else:
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

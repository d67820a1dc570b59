"""The repository's kernels/ and passes/ folders never stand in for PyPI's ``kernels`` / ``passes``
when Python runs from the repository root, as the README's commands and the benchmarks' children do
(``python -m ...``, ``python -c``: the root is sys.path[0]). Nothing is installed: a stand-in package
on PYTHONPATH plays the installed one."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["kernels", "passes"])
def test_an_installed_package_of_that_name_wins_from_the_repository_root(tmp_path, name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("CUDAProperties = 'the installed one'\n")
    r = _run(f"import {name}; print({name}.CUDAProperties, {name}.__file__)", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:3] == ["the", "installed", "one"] and str(tmp_path) in r.stdout
    r = _run(f"import {name}, importlib; importlib.import_module('{name}'); import peftc.{name} as ours; "
             f"print(ours.__name__, {name}.CUDAProperties)", tmp_path)
    assert r.returncode == 0 and r.stdout.split()[0] == f"peftc.{name}", r.stderr  # peftc's own still loads


@pytest.mark.parametrize("name", ["kernels", "passes"])
def test_without_one_the_name_reads_as_not_installed(name):
    """As transformers checks a package (find_spec, then metadata, then import: no __file__ and no
    version means a namespace folder, not an install), and never the repository's code."""
    r = _run(f"""
import importlib.metadata, importlib.util
import {name}
try:
    importlib.metadata.version("{name}")
    print("installed", {name}.__file__)
except importlib.metadata.PackageNotFoundError:
    print("absent", {name}.__file__, getattr({name}, "__version__", None), list({name}.__path__))
""")
    assert r.returncode == 0, r.stderr
    kind, *rest = r.stdout.split()
    assert (kind == "absent" and rest == ["None", "None", "[]"]) or (kind == "installed" and str(ROOT) not in rest[0])


def test_transformers_and_peft_import_from_the_repository_root():
    r = _run("import transformers.modeling_utils, peft; from transformers.utils import is_kernels_available; "
             "print(peft.__name__)")
    assert r.returncode == 0 and r.stdout.strip() == "peft", r.stderr[-2000:]

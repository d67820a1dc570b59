"""Running Triton kernels under its CPU interpreter from a normal test session.

TRITON_INTERPRET must be set before triton is imported, so the interpreted cases run in a
fresh Python process; the calling test asserts how many ran (``assert_all_passed``).
"""

import os
import re
import subprocess
import sys

import pytest


def run_interpreted(args: list[str]) -> str:
    """``python <args>`` with TRITON_INTERPRET=1; asserts it succeeded, returns its output's tail."""
    pytest.importorskip("triton", reason="triton is not installed (the gpu or dev extra: pip install -e .[dev])")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    return tail


_COUNT = re.compile(r"\b(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b")


def pytest_counts(tail: str) -> dict[str, int]:
    """The counts on pytest's final summary line, by outcome: "8 passed, 4 deselected in 3.10s" ->
    {"passed": 8, "deselected": 4} ("errors" / "warnings" as "error" / "warning")."""
    line = next((s for s in reversed(tail.splitlines()) if re.search(r"\bin [\d.]+s\b", s) and _COUNT.search(s)),
                None)
    assert line is not None, f"no pytest summary line in:\n{tail}"
    return {what.removesuffix("s") if what in ("errors", "warnings") else what: int(n)
            for n, what in _COUNT.findall(line)}


def assert_all_passed(tail: str, n: int) -> None:
    """Exactly ``n`` cases passed and none failed, errored, skipped or xfailed (deselected is fine)."""
    counts = pytest_counts(tail)
    others = {k: v for k, v in counts.items() if k not in ("passed", "deselected", "warning")}
    assert counts.get("passed") == n and not others, f"want {n} passed, nothing else; got {counts}\n{tail}"

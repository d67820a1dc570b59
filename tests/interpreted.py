"""Running Triton kernels under its CPU interpreter from a normal test session.

TRITON_INTERPRET must be set before triton is imported, so the interpreted cases run in a
fresh Python process; the calling test asserts how many ran.
"""

import os
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

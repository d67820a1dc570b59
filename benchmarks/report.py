"""One home for what every benchmark writes: files replaced atomically (temp file + rename, mode
0644) and its own marked section of RESULTS.md, so one benchmark's run never drops another's
results.

    write_section(Path("benchmarks/RESULTS.md"), "memory", markdown_text)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "write_section", "markers"]


def atomic_write(path: Path, content: str | Callable[[str], None]) -> None:
    """Writes ``content`` (text, or a function writing to the temp path it is given) via a temp
    file in the same directory, then renames: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        if callable(content):
            content(tmp)
        else:
            Path(tmp).write_text(content)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(report: Path, name: str, text: str) -> None:
    """Replaces section ``name`` of ``report`` (between its markers) by ``text``, or appends it."""
    begin, end = markers(name)
    body = f"{begin}\n{text.strip()}\n{end}\n"
    old = Path(report).read_text() if Path(report).exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + body + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + body
    atomic_write(Path(report), new)

"""Warm starts: what the ``compile`` phase generated, saved next to an adapter and read back.

    DIR/peftc_compile_cache.bin      torch.compiler's mega-cache (dynamo, AOTAutograd, inductor graphs)
    DIR/peftc_compile_kernels.tar    the C++ libraries those graphs load and inductor's CPU-feature probes
    DIR/peftc_compile_cache.json     the key both are valid for (versions, model, dtype, CPU), written last

The mega-cache holds each graph's generated Python wrapper but not the shared libraries its C++
kernels compile into: without them a new process with an empty inductor cache dir recompiles
every kernel on its first call, and re-runs the compiles by which inductor finds the CPU's
vector features (with the libraries restored: 512-wide Llama's first token 5 s instead of 11 s).
The libraries are named by a hash of their source and compiler command line, so a restored one
is found exactly where inductor would have built it, and one made with other flags is never
picked up.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

__all__ = ["save_artifacts", "load_artifacts", "loaded_libraries", "cache_key", "restore_kernels", "CACHE_FILE", "KERNELS_FILE", "CACHE_KEY"]

CACHE_FILE, KERNELS_FILE, CACHE_KEY = "peftc_compile_cache.bin", "peftc_compile_kernels.tar", "peftc_compile_cache.json"


def _inductor_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()).resolve()


def cache_key(model) -> dict:
    """What saved artefacts are checked against before loading: the versions that generated
    them, the model (its configuration and dtype) and the CPU the kernels were built for. The
    spec needs no entry: inductor's own keys hash each graph, so an artefact of another adapter
    is never used for this one."""
    import transformers

    config = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(model)
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "model": hashlib.sha256(text.encode()).hexdigest()[:16], "dtype": str(next(model.parameters()).dtype),
            "cpu": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"}


def loaded_libraries() -> dict[str, Path]:
    """The shared libraries this process has loaded from inductor's cache dir, by their path
    relative to it: the mapped files on Linux (ctypes and Python-binding loads alike), else the
    extension modules in ``sys.modules``."""
    root, found = _inductor_dir(), set()
    try:
        with open("/proc/self/maps") as maps:
            found = {line.split(maxsplit=5)[-1].strip() for line in maps if line.rstrip().endswith(".so")}
    except OSError:
        found = {m.__file__ for m in list(sys.modules.values()) if str(getattr(m, "__file__", "")).endswith(".so")}
    out = {}
    for f in found:
        p = Path(f).resolve()
        if p.is_relative_to(root) and p.is_file():
            out[p.relative_to(root).as_posix()] = p
    return out


def _probes() -> dict[str, Path]:
    """The small libraries inductor builds to test each vector ISA (their source defines
    ``*_chk_kernel`` functions) once per cache dir; a probe runs in a subprocess, so none is
    mapped here."""
    root, out = _inductor_dir(), {}
    for lib in root.glob("*/*.so"):
        src = lib.with_suffix(".cpp")
        if src.is_file() and src.stat().st_size < 16384 and "_chk_kernel" in src.read_text(errors="replace"):
            out[lib.relative_to(root).as_posix()] = lib
    return out


def _write(directory: Path, name: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_artifacts(cm, directory) -> str:
    """Writes every artefact inductor compiled or loaded in this process and the kernel
    libraries they run; the key last, so a directory is never read with a partial set."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return "compile cache: nothing compiled yet (run a call first): not written"
    blob, _ = saved
    libs = {**_probes(), **loaded_libraries()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel, path in sorted(libs.items()):
            tar.add(path, arcname=rel, recursive=False)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CACHE_KEY).unlink(missing_ok=True)  # a crash below leaves no key: nothing is loaded
    _write(directory, KERNELS_FILE, buf.getvalue())
    _write(directory, CACHE_FILE, blob)
    _write(directory, CACHE_KEY, json.dumps(cache_key(cm.get_base_model())).encode())
    return (f"compile cache: {len(blob):,} bytes and {len(libs)} kernel librar{'y' if len(libs) == 1 else 'ies'} "
            f"({len(buf.getvalue()):,} bytes) written to {directory}")


def restore_kernels(tar_path: Path) -> tuple[int, int]:
    """Puts the saved libraries where inductor looks for them; returns (restored, already there).
    Only plain ``.so`` files at relative paths are taken; each lands by temp file and rename."""
    root, restored, present = _inductor_dir(), 0, 0
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            rel = Path(member.name)
            if not member.isfile() or rel.is_absolute() or ".." in rel.parts or rel.suffix != ".so":
                raise ValueError(f"{tar_path}: unexpected entry {member.name!r} (only kernel libraries are saved)")
            target = root / rel
            if target.is_file():
                present += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            _write(target.parent, target.name, tar.extractfile(member).read())
            os.chmod(target, 0o755)
            restored += 1
    return restored, present


def load_artifacts(spec, model, directory) -> str | None:
    """Loads artefacts saved next to an adapter when their key matches this model, versions
    and CPU (else says why they were not used); None when there are none."""
    directory = Path(directory)
    if not (directory / CACHE_FILE).is_file() or not (directory / CACHE_KEY).is_file():
        return None
    saved, wanted = json.loads((directory / CACHE_KEY).read_text()), cache_key(model)
    differ = sorted(k for k in wanted if saved.get(k) != wanted[k])
    if differ:
        return f"compile cache at {directory} not used: it was made for another {', '.join(differ)}"
    torch.compiler.load_cache_artifacts((directory / CACHE_FILE).read_bytes())
    kernels = "no kernel libraries saved with it (they compile on the first call)"
    if (directory / KERNELS_FILE).is_file():
        try:
            restored, present = restore_kernels(directory / KERNELS_FILE)
        except (tarfile.TarError, ValueError, OSError) as e:
            return f"compile cache: loaded from {directory} (warm start); kernel libraries not restored ({e})"
        kernels = f"{restored + present} kernel librar{'y' if restored + present == 1 else 'ies'} " \
                  f"({restored} restored into inductor's cache dir, {present} already there)"
    return f"compile cache: loaded from {directory} (warm start); {kernels}"

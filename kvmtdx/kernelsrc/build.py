"""Compile the extracted kernel code into a shared library, once per (sources, shim) hash.

The library is a plain C shared object built by the C compiler on PATH (or
$CC) and loaded with cffi in ABI mode: no Python headers, no setuptools,
only a compiler, and only for this backend.  It is cached under the cache
directory by the hash of its inputs (the tree's files the extractor reads,
the shim, the extractor's version and the compiler flags), so a second run
on the same tree loads it without parsing or compiling anything.  The
generated C file is kept beside it for whoever wants to read what ran.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from kvmtdx.cachedir import user_cache
from kvmtdx.kernelsrc import extract
from kvmtdx.kernelsrc.cparse import Kind
from kvmtdx.kernelsrc.errors import KernelSourceError

FLAGS: tuple[str, ...] = (
    "-std=gnu11", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
    # What older compilers only warn about would run as garbage here.
    "-Werror=implicit-function-declaration", "-Werror=implicit-int",
    "-Werror=incompatible-pointer-types", "-Werror=int-conversion",
    "-Werror=return-type",
)
_ERROR = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?:\d+:)? (?:fatal )?error: (?P<msg>.*)$",
                    re.M)
# gcc quotes names with typographic quotes in a UTF-8 locale, ASCII ones otherwise.
_Q = "[\u2018\u2019'`\"]"
_EXPANSION = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+):(?:\d+:)? note: in expansion of macro",
                        re.M)
_IMPLICIT = re.compile(rf"implicit declaration of function {_Q}(?P<name>\w+)")
_UNDECLARED = re.compile(rf"{_Q}(?P<name>\w+){_Q} undeclared")


def cache_dir() -> Path:
    """$KVMTDX_CACHE_DIR; a checkout's own .cache/; else the XDG cache directory."""
    checkout = Path(__file__).resolve().parents[2]
    if not os.environ.get("KVMTDX_CACHE_DIR") and (checkout / "pyproject.toml").is_file() \
            and (checkout / ".git").exists():
        return checkout / ".cache" / "kernelsrc"
    return user_cache("kernelsrc")


def compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    found = shutil.which(cc) or (shutil.which("gcc") if "CC" not in os.environ else None)
    if found is None:
        raise KernelSourceError(
            f"no C compiler ({cc}) on PATH: the kernel-source backend compiles the tree's "
            "TDX code; install gcc or set CC", missing=True)
    return found


def built_library(sources: dict[str, str]) -> tuple[Path, bool]:
    """The library for these sources, and whether it was compiled now (False: cached)."""
    key = extract.cache_key(sources, FLAGS)
    out_dir = cache_dir()
    lib = out_dir / f"tdx-{key}.so"
    if lib.is_file():
        return lib, False
    cc = compiler()
    extraction = extract.extract(sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    c_file = out_dir / f"tdx-{key}.c"
    c_file.write_text(extraction.source)
    fd, tmp = tempfile.mkstemp(prefix=f"tdx-{key}.", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, "-o", tmp, str(c_file)], capture_output=True,
                             text=True, check=False)
        if res.returncode != 0:
            raise KernelSourceError(compile_error(res.stderr, extraction))
        os.replace(tmp, lib)  # atomic: a concurrent run sees no half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib, True


def compile_error(stderr: str, extraction: extract.Extraction) -> str:
    """The first compiler error, as one line naming the kernel function and file it is in."""
    m = _ERROR.search(stderr)
    if m is None:
        last = [ln for ln in stderr.splitlines() if ln.strip()]
        return f"the extracted TDX code does not compile: {last[-1] if last else 'no output'}"
    path, line, msg = m.group("file"), int(m.group("line")), m.group("msg").strip()
    item = extraction.item_at(path, line)
    if item is not None and item.kind == Kind.MACRO:
        # The error sits in a macro's body: blame the definition that expanded it.
        for note in _EXPANSION.finditer(stderr, m.end()):
            use = extraction.item_at(note.group("file"), int(note.group("line")))
            if use is not None and use.kind != Kind.MACRO:
                path, line, item = note.group("file"), int(note.group("line")), use
                break
    where = f"{path}:{line}"
    missing = _IMPLICIT.search(msg) or _UNDECLARED.search(msg)
    if item is not None and missing is not None:
        return (f"{item.name} ({where}) uses {missing.group('name')}, which neither the tree "
                f"nor the kvmtdx shim defines (a series renamed or added it?): {msg}")
    if item is not None:
        return f"{item.name} ({where}) does not compile against the kvmtdx shim: {msg}"
    return f"the kvmtdx glue does not compile against this tree ({where}): {msg}"

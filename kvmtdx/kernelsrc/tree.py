"""A kernel tree to read, and the patches applied to a private copy of it first.

A tree is any directory holding arch/x86/kvm/vmx/tdx.c: an unpacked Debian
linux-source tarball, a git checkout, the files scripts/fetch-kernel-source
keeps.  With patches, only the files the extractor reads and the files the
patches touch are copied to a private directory and patched there with
patch(1) (-p1, as git format-patch writes them); the tree itself is never
written.  `--patch NAME` also takes the name of a patch bundled with
kvmtdx (kvmtdx/data/patches/NAME.patch).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from kvmtdx.kernelsrc.errors import KernelSourceError
from kvmtdx.kernelsrc.extract import SOURCE_FILES, TDX_C

_DIFF_TARGET = re.compile(r"^\+\+\+ (?:b/)?(?P<path>[^\t\n]+)", re.M)
_VERSION = re.compile(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)[ \t]*=[ \t]*(\S*)", re.M)


def bundled_patches() -> list[str]:
    folder = resources.files("kvmtdx").joinpath("data").joinpath("patches")
    return sorted(p.name.removesuffix(".patch") for p in folder.iterdir()
                  if p.name.endswith(".patch"))


def patch_text(name_or_file: str) -> tuple[str, str]:
    """(label, text) of a patch file, or of a bundled patch by name."""
    path = Path(name_or_file)
    if path.is_file():
        try:
            return str(path), path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise KernelSourceError(f"--patch {name_or_file}: cannot read it: {e}") from None
    if name_or_file in bundled_patches():
        text = resources.files("kvmtdx").joinpath("data").joinpath("patches").joinpath(
            f"{name_or_file}.patch").read_text()
        return f"{name_or_file} (bundled)", text
    raise KernelSourceError(f"--patch {name_or_file}: no such file, and no bundled patch of "
                            f"that name (bundled: {', '.join(bundled_patches()) or 'none'})")


def check_tree(tree: Path) -> Path:
    if not tree.is_dir():
        raise KernelSourceError(f"--kernel-source {tree}: not a directory")
    if not (tree / "arch" / "x86" / "kvm").is_dir():
        raise KernelSourceError(f"--kernel-source {tree}: not a Linux tree "
                                "(no arch/x86/kvm/)")
    if not (tree / TDX_C).is_file():
        raise KernelSourceError(f"--kernel-source {tree}: no {TDX_C}, so no KVM TDX "
                                "(Linux 6.16 or later has it)", missing=True)
    return tree


def version(tree: Path) -> str | None:
    """The tree's release from its top Makefile ('7.3.4'), or None."""
    try:
        text = (tree / "Makefile").read_text(errors="replace")[:2000]
    except OSError:
        return None
    parts: dict[str, str] = dict(_VERSION.findall(text))
    if "VERSION" not in parts or "PATCHLEVEL" not in parts:
        return None
    v = f"{parts['VERSION']}.{parts['PATCHLEVEL']}"
    if parts.get("SUBLEVEL") not in (None, "", "0"):
        v += f".{parts['SUBLEVEL']}"
    return v + parts.get("EXTRAVERSION", "")


@contextmanager
def patched(tree: Path, patches: Sequence[str]) -> Iterator[Path]:
    """The tree itself without patches; else a private, patched copy of what is read."""
    check_tree(tree)
    if not patches:
        yield tree
        return
    texts = [patch_text(p) for p in patches]
    if shutil.which("patch") is None:
        raise KernelSourceError("--patch needs the patch(1) tool, which is not on PATH",
                                missing=True)
    with tempfile.TemporaryDirectory(prefix="kvmtdx-tree-") as tmp:
        copy = Path(tmp)
        wanted = set(SOURCE_FILES) | {"Makefile"}
        for _, text in texts:
            wanted |= {m.group("path").strip() for m in _DIFF_TARGET.finditer(text)}
        for rel in sorted(wanted):
            src = tree / rel
            if src.is_file():
                (copy / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, copy / rel)
        for label, text in texts:
            _apply(copy, label, text)
        yield copy


def _apply(copy: Path, label: str, text: str) -> None:
    res = subprocess.run(["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch",
                          "-r", "-", "-d", str(copy)], input=text, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "FAILED" in ln or "can't find" in ln
                    or "malformed" in ln.lower() or "only garbage" in ln),
                   lines[-1] if lines else f"exit status {res.returncode}")
        raise KernelSourceError(f"--patch {label} does not apply to the tree: {why.strip()}")

"""The kernel-source backend: KVM's own TDX code, cut out of a kernel tree and compiled.

`open_backend(tree, patches, module, host)` gives a syscall seam whose TDX
VM ioctls run the tree's arch/x86/kvm/vmx/tdx.c (and cpuid.c's lookup),
compiled for userspace against a small shim, with the TDX module answered
by kvmtdx's module model.  What it models and what it cannot: README,
"The kernel-source backend".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmtdx.kernelsrc.backend import KernelSourceHost
from kvmtdx.kernelsrc.build import built_library
from kvmtdx.kernelsrc.errors import KernelSourceError
from kvmtdx.kernelsrc.extract import read_sources
from kvmtdx.kernelsrc.module_bridge import ModuleBridge
from kvmtdx.kernelsrc.tree import bundled_patches, patched, version
from kvmtdx.model.profiles import Host, ModuleProfile

__all__ = ["KernelSourceBackend", "KernelSourceError", "KernelSourceHost", "bundled_patches",
           "open_backend"]


@dataclass
class KernelSourceBackend:
    """The seam, what it was built from, and a label for reports."""

    seam: KernelSourceHost
    label: str
    tree: Path
    version: str | None
    patches: tuple[str, ...]
    module: ModuleProfile
    host: Host
    compiled: bool  # False: the library came from the cache


def open_backend(tree: str | Path, patches: Sequence[str], module: ModuleProfile, host: Host,
                 *, key_ids: int = 16) -> KernelSourceBackend:
    """A seam running `tree`'s TDX code (after `patches`, files or bundled names).

    Raises KernelSourceError (exit 2, or 4 when a compiler or the TDX code is missing).
    """
    root = Path(tree)
    with patched(root, patches) as source:
        release = version(source)
        library, compiled = built_library(read_sources(source))
    seam = KernelSourceHost(library, ModuleBridge(module, host), key_ids=key_ids)
    what = f"Linux {release}" if release else "a Linux tree"
    if patches:
        what += " + " + ", ".join(patches)
    label = (f"kernel source ({what} at {root}; module {module.name}, host {host.name})")
    return KernelSourceBackend(seam=seam, label=label, tree=root, version=release,
                               patches=tuple(patches), module=module, host=host,
                               compiled=compiled)

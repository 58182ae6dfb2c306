"""Shared by the kernel-source backend tests: the Linux 7.3 tree, and running verify on it.

The tree is what scripts/fetch-kernel-source keeps in .cache/linux-source/
(or $KVMTDX_KERNEL_SOURCE).  Without it, or without a C compiler, these
tests skip with the reason, except in CI (CI=true), where they must run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers import TRAP_CHECKS, WARN_CHECK

from kvmtdx import checks
from kvmtdx.kernelsrc import KernelSourceBackend, open_backend
from kvmtdx.kernelsrc.extract import SOURCE_FILES
from kvmtdx.knowledge import Given
from kvmtdx.model.profiles import MAX_HOST, Host, load_profile

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TREE = ROOT / ".cache" / "linux-source" / "linux-source-7.3"
# No vCPUs on this backend, so the bypass fails its traps only (effective_* skip).
BYPASS = set(TRAP_CHECKS)
# Linux 7.3 (and the series, which leaves __tdx_td_init alone) answers a malformed leaf
# 0x1F with the module's non-operand status: -EIO and a WARN a user can trigger.
WARN = {WARN_CHECK}


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the kernel-source tests for real: {reason}")
    pytest.skip(reason)


def linux_tree() -> Path:
    """The Linux 7.3 tree and a C compiler, or skip (fail in CI) saying which is missing."""
    tree = Path(os.environ.get("KVMTDX_KERNEL_SOURCE") or DEFAULT_TREE)
    if not (tree / "arch/x86/kvm/vmx/tdx.c").is_file():
        _unavailable(f"no Linux 7.3 tree at {tree} (run scripts/fetch-kernel-source)")
    if shutil.which(os.environ.get("CC") or "cc") is None and shutil.which("gcc") is None:
        _unavailable("no C compiler (cc) on PATH")
    return tree


def copy_tree(tree: Path, dest: Path) -> Path:
    """The files the backend reads, copied to `dest`, for a test to edit."""
    for rel in (*SOURCE_FILES, "Makefile"):
        if (tree / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tree / rel, dest / rel)
    return dest


def backend(tree: Path, patches: Sequence[str] = (), module: str = "2.0",
            host: Host = MAX_HOST, key_ids: int = 16) -> KernelSourceBackend:
    return open_backend(tree, patches, load_profile(module), host, key_ids=key_ids)


def verify(b: KernelSourceBackend, policy: str = "auto") -> checks.VerifyReport:
    given = Given(module=b.module, module_source=f"the kernel source's module {b.module.name}",
                  host=b.host, host_source="the kernel source's host", policy=policy)
    return checks.run_verify(b.seam, backend_label=b.label, given=given)


def failed(report: checks.VerifyReport) -> set[str]:
    return {c.id for c in report.checks if c.status == "fail"}

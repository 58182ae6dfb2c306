"""Shared fixtures: fd-leak checking (psutil), and real-device / TDX gating.

Shared helpers that are not fixtures (CLI runner, fake seams, trap requests) are in helpers.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest

from kvmtdx.fuzz.engine import pin_constants

# helpers.py holds shared asserts (golden files, the KTAP reader): let pytest explain them.
pytest.register_assert_rewrite("helpers")

# Hypothesis draws now and then integers found in the source of the modules loaded so far;
# `kvmtdx fuzz` loads them all before its search.  Loading them all here, before any test,
# gives every hypothesis test the same draws whichever tests ran before it.
pin_constants()

KVM_PATH = "/dev/kvm"


def fd_targets() -> dict[int, str]:
    """fd -> what it points at, for this process (anon inodes included, e.g. kvm-vm)."""
    out: dict[int, str] = {}
    fd_dir = "/proc/self/fd"
    for name in os.listdir(fd_dir):
        try:
            out[int(name)] = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue  # the fd listdir itself used, gone by now
    return out


class FdSnapshot:
    """What psutil sees open in this process, to compare before and after."""

    def __init__(self) -> None:
        proc = psutil.Process()
        self.num_fds = proc.num_fds()
        self.files = {(f.path, f.fd) for f in proc.open_files()}
        self.targets = fd_targets()

    def leaked_since(self, before: FdSnapshot) -> list[str]:
        leaks = [f"{fd} -> {t}" for fd, t in sorted(self.targets.items())
                 if before.targets.get(fd) != t]
        leaks += [f"{fd} -> {p} (psutil)" for p, fd in sorted(self.files - before.files)]
        if self.num_fds > before.num_fds and not leaks:
            leaks.append(f"num_fds grew from {before.num_fds} to {self.num_fds}")
        return leaks


@pytest.fixture
def no_fd_leak() -> Iterator[FdSnapshot]:
    """Fails the test if it leaves any file descriptor open (checked after the test body)."""
    before = FdSnapshot()
    yield before
    leaks = FdSnapshot().leaked_since(before)
    assert not leaks, "file descriptors left open: " + "; ".join(leaks)


def kvm_usable() -> str | None:
    """None when /dev/kvm can be opened here, else why not (the skip reason)."""
    if not os.path.exists(KVM_PATH):
        return f"{KVM_PATH} is absent on this host"
    try:
        fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{KVM_PATH} cannot be opened: {e.strerror}"
    os.close(fd)
    return None


def tdx_unavailable() -> str | None:
    """None when the real KVM offers KVM_X86_TDX_VM, else why not."""
    why = kvm_usable()
    if why is not None:
        return why
    from kvmtdx.device import tdx_status

    status = tdx_status()
    return None if status.available else status.reason


@pytest.fixture
def real_kvm() -> None:
    why = kvm_usable()
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def real_tdx() -> None:
    why = tdx_unavailable()
    if why is not None:
        pytest.skip(f"needs a TDX host: {why}")

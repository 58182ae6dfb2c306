"""The simulated kernel's access to the caller's memory, and how it fails.

Like the kernel's copy_from_user/copy_to_user, an address outside what a
user process can map is -EFAULT; anything else is read or written for real
at the address the caller handed over.
"""

from __future__ import annotations

import errno
import functools
import os

from kvmtdx import uapi

# Addresses the simulated kernel can reach: nothing in the first 64 KiB
# (mmap_min_addr), nothing above the x86-64 4-level user address space.
LOWEST_USER_ADDRESS = 0x10000
TASK_SIZE_MAX = 0x7FFFFFFFF000


def fail(code: int) -> OSError:
    """The error a syscall returns as -code."""
    return OSError(code, _strerror(code))


@functools.cache
def _strerror(code: int) -> str:
    return os.strerror(code)


def _check_range(address: int, size: int) -> None:
    if address < LOWEST_USER_ADDRESS or address + size > TASK_SIZE_MAX:
        raise fail(errno.EFAULT)


def copy_from_user(address: int, size: int) -> bytes:
    _check_range(address, size)
    return uapi.peek(address, size)


def copy_to_user(address: int, data: bytes) -> None:
    _check_range(address, len(data))
    uapi.poke(address, data)

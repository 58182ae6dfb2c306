"""Status codes, in one home: errno names and TDX module statuses (SEAMCALL completion codes).

A TDX module status is 64 bits: the class in the upper 32 (Linux
arch/x86/include/asm/shared/tdx_errno.h names them), details in the lower 32;
for operand errors the low byte is the operand id (the TD_PARAMS field or the
MSR the module objects to).
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from enum import IntEnum


def errno_name(code: int) -> str:
    """'EINVAL' for 22; 0 is 'success' (the one spelling every report uses)."""
    if code == 0:
        return "success"
    return _errno.errorcode.get(code, f"E{code}")


def errno_from_name(name: str | None) -> int:
    if not name or name == "success":
        return 0
    value = getattr(_errno, name, None)
    if not isinstance(value, int):
        raise ValueError(f"unknown errno name {name!r}")
    return value


STATUS_MASK = 0xFFFFFFFF00000000


class TdxStatus(IntEnum):
    """TDX module status classes (the upper 32 bits of a completion status)."""

    TDX_SUCCESS = 0
    TDX_OPERAND_INVALID = 0xC000010000000000
    TDX_OPERAND_BUSY = 0x8000020000000000
    TDX_RND_NO_ENTROPY = 0x8000020300000000
    TDX_INCORRECT_MSR_VALUE = 0xC000092100000000  # operand: the MSR (0x10A, IA32_ARCH_CAPABILITIES)


class Operand(IntEnum):
    """TD_PARAMS operand ids TDH.MNG.INIT names in the low bits of its status."""

    ATTRIBUTES = 64
    XFAM = 65
    CPUID_CONFIG = 69


def operand_invalid(operand: int) -> int:
    return int(TdxStatus.TDX_OPERAND_INVALID) | int(operand)


def status_class(raw: int) -> int:
    return raw & STATUS_MASK


@dataclass(frozen=True, slots=True)
class HwError:
    """A decoded TDX module status (the value KVM copies to kvm_tdx_cmd.hw_error)."""

    raw: int
    status: int
    status_name: str
    operand: int
    operand_name: str

    @classmethod
    def decode(cls, raw: int) -> HwError:
        status = raw & STATUS_MASK
        operand = raw & 0xFF
        try:
            status_name = TdxStatus(status).name
        except ValueError:
            status_name = f"0x{status:016x}"
        try:
            operand_name = Operand(operand).name
        except ValueError:
            operand_name = f"operand {operand}"
        return cls(raw, status, status_name, operand, operand_name)

    def __str__(self) -> str:
        if self.raw == 0:
            return "0"
        return f"0x{self.raw:016x} ({self.status_name}, {self.operand_name})"

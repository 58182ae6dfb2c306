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
    """TDX module status classes (the upper 32 bits of a completion status).

    Values from the public module source, include/auto_gen*/tdx_error_codes_defs.h
    (intel/tdx-module); TDX_SW_ERROR and the TDX_SEAMCALL_* values are the
    kernel's own (arch/x86/include/asm/tdx.h).
    """

    TDX_SUCCESS = 0
    TDX_OPERAND_INVALID = 0xC000010000000000
    TDX_OPERAND_ADDR_RANGE_ERROR = 0xC000010100000000
    TDX_EVENT_FILTER_INVALID = 0xC000010200000000
    TDX_OPERAND_BUSY = 0x8000020000000000
    TDX_SYS_BUSY = 0x8000020200000000
    TDX_RND_NO_ENTROPY = 0x8000020300000000
    TDX_PAGE_METADATA_INCORRECT = 0xC000030000000000
    TDX_SYS_NOT_READY = 0xC000050500000000
    TDX_SYS_SHUTDOWN = 0xC000050600000000
    TDX_TDCS_NOT_ALLOCATED = 0xC000060600000000
    TDX_LIFECYCLE_STATE_INCORRECT = 0xC000060700000000
    TDX_OP_STATE_INCORRECT = 0xC000060800000000
    TDX_KEY_GENERATION_FAILED = 0x8000080000000000
    TDX_TD_KEYS_NOT_CONFIGURED = 0x8000081000000000
    TDX_KEY_STATE_INCORRECT = 0xC000081100000000
    TDX_KEY_CONFIGURED = 0x0000081500000000
    TDX_LIMIT_CPUID_MAXVAL_SET = 0xC000090100000000
    TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED = 0xC000090400000000
    TDX_INCONSISTENT_MSR = 0xC000092000000000
    TDX_INCORRECT_MSR_VALUE = 0xC000092100000000  # operand: the MSR (0x10A, IA32_ARCH_CAPABILITIES)
    TDX_SW_ERROR = 0x8000FF0000000000


class Operand(IntEnum):
    """TD_PARAMS operand ids TDH.MNG.INIT names in the low bits of its status."""

    RCX = 1
    RDX = 2
    R8 = 8
    ATTRIBUTES = 64
    XFAM = 65
    EXEC_CONTROLS = 66
    EPTP_CONTROLS = 67
    MAX_VCPUS = 68
    CPUID_CONFIG = 69
    TSC_FREQUENCY = 70
    NUM_L2_VMS = 71
    IA32_ARCH_CAPABILITIES_CONFIG = 72


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

"""What one KVM_TDX_INIT_VM attempt came to (spec section 5), and TDX status decoding.

Shared by the device layer (what the kernel answered) and the mirror (what it
should answer, with the reason).  Two outcomes are the same answer when kind,
errno and hw_error agree; the reason fields only explain a prediction.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Kind(str, Enum):
    ACCEPTED = "ACCEPTED"
    KVM_REJECTED = "KVM_REJECTED"
    MODULE_REJECTED = "MODULE_REJECTED"
    ERROR = "ERROR"


# TDX module SEAMCALL status classes: Linux arch/x86/include/asm/shared/tdx_errno.h.
STATUS_MASK = 0xFFFFFFFF00000000
TDX_OPERAND_INVALID = 0xC000010000000000
TDX_OPERAND_BUSY = 0x8000020000000000
TDX_RND_NO_ENTROPY = 0x8000020300000000
TDX_INCORRECT_MSR_VALUE = 0xC000030C00000000
STATUS_NAMES: dict[int, str] = {
    TDX_OPERAND_INVALID: "TDX_OPERAND_INVALID",
    TDX_OPERAND_BUSY: "TDX_OPERAND_BUSY",
    TDX_RND_NO_ENTROPY: "TDX_RND_NO_ENTROPY",
    TDX_INCORRECT_MSR_VALUE: "TDX_INCORRECT_MSR_VALUE",
}

# TD_PARAMS operand ids that TDH.MNG.INIT names in the low bits of its status
# (spec section 4, step 10; public TDX module sources).
OPERAND_ATTRIBUTES = 64
OPERAND_XFAM = 65
OPERAND_CPUID_CONFIG = 69
OPERAND_NAMES: dict[int, str] = {
    OPERAND_ATTRIBUTES: "ATTRIBUTES",
    OPERAND_XFAM: "XFAM",
    OPERAND_CPUID_CONFIG: "CPUID_CONFIG",
}


def operand_invalid(operand: int) -> int:
    return TDX_OPERAND_INVALID | operand


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
        return cls(
            raw=raw,
            status=status,
            status_name=STATUS_NAMES.get(status, f"0x{status:016x}"),
            operand=operand,
            operand_name=OPERAND_NAMES.get(operand, f"operand {operand}"),
        )

    def __str__(self) -> str:
        if self.raw == 0:
            return "0"
        return f"0x{self.raw:016x} ({self.status_name}, {self.operand_name})"


def errno_name(code: int | None) -> str | None:
    if not code:
        return None
    return _errno.errorcode.get(code, f"E{code}")


def errno_from_name(name: str | None) -> int:
    if not name:
        return 0
    value = getattr(_errno, name, None)
    if not isinstance(value, int):
        raise ValueError(f"unknown errno name {name!r}")
    return value


@dataclass(frozen=True, slots=True)
class Outcome:
    """One INIT_VM result.  `errno` is positive (0 when accepted)."""

    kind: Kind
    errno: int = 0
    hw_error: int = 0
    check: str | None = None
    leaf: int | None = None
    subleaf: int | None = None
    register: str | None = None
    bit: int | None = None

    @classmethod
    def classify(cls, err: int, hw_error: int, **reason: Any) -> Outcome:
        """Spec section 5: the kind follows from errno and hw_error alone."""
        if err == 0:
            kind = Kind.ACCEPTED
        elif err == _errno.EINVAL:
            kind = Kind.MODULE_REJECTED if hw_error else Kind.KVM_REJECTED
        else:
            kind = Kind.ERROR
        return cls(kind=kind, errno=err, hw_error=hw_error, **reason)

    @property
    def errno_name(self) -> str | None:
        return errno_name(self.errno)

    @property
    def hw(self) -> HwError:
        return HwError.decode(self.hw_error)

    def same_answer(self, other: Outcome) -> bool:
        return (self.kind, self.errno, self.hw_error) == (other.kind, other.errno, other.hw_error)

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.kind.value,
            "errno": self.errno_name,
            "hw_error": self.hw_error,
            "check": self.check,
            "leaf": self.leaf,
            "subleaf": self.subleaf,
            "register": self.register,
            "bit": self.bit,
        }

    def describe(self) -> str:
        parts = [self.kind.value]
        if self.errno:
            parts.append(f"-{self.errno_name}")
        if self.hw_error:
            parts.append(f"hw_error {self.hw}")
        if self.check:
            where = self.check
            if self.leaf is not None:
                where += f" at leaf 0x{self.leaf:x}"
                if self.subleaf is not None:
                    where += f".{self.subleaf}"
            if self.register:
                where += f" {self.register.upper()}"
            if self.bit is not None:
                where += f" bit {self.bit}"
            parts.append(f"({where})")
        return " ".join(parts)

"""What one KVM_TDX_INIT_VM attempt came to (spec section 5).

Shared by the device layer (what the kernel answered) and the mirror (what it
should answer, with the reason).  Two outcomes are the same answer when kind,
errno and hw_error agree; the reason fields only explain a prediction.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from enum import Enum
from typing import Any

from kvmtdx.status import HwError, errno_name


class Kind(str, Enum):
    ACCEPTED = "ACCEPTED"
    KVM_REJECTED = "KVM_REJECTED"
    MODULE_REJECTED = "MODULE_REJECTED"
    ERROR = "ERROR"


class Decider(str, Enum):
    """Who decided a predicted outcome: KVM's own checks or the TDX module's."""

    KVM = "kvm"
    MODULE = "module"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One INIT_VM result.  `errno` is positive (0 when accepted).

    A prediction also says why: `decider`, the `check` by name and where it
    applies; an observed outcome carries only kind, errno and hw_error.
    """

    kind: Kind
    errno: int = 0
    hw_error: int = 0
    check: str | None = None
    decider: Decider | None = None
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
        return errno_name(self.errno) if self.errno else None

    @property
    def hw(self) -> HwError:
        return HwError.decode(self.hw_error)

    def same_answer(self, other: Outcome) -> bool:
        return (self.kind, self.errno, self.hw_error) == (other.kind, other.errno, other.hw_error)

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

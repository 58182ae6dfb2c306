"""What a probe finds: a class per bit, a class per value field, and the run around them.

These types carry no JSON; kvmtdx.report.probe renders them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from kvmtdx.knowledge import Knowledge
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.structs import Capabilities
from kvmtdx.verdict import Status


class BitClass(str, Enum):
    REPORTED_ACCEPTED = "REPORTED_ACCEPTED"
    REPORTED_REJECTED = "REPORTED_REJECTED"
    HIDDEN_KVM_REJECTED = "HIDDEN_KVM_REJECTED"
    HIDDEN_MODULE_REJECTED = "HIDDEN_MODULE_REJECTED"
    HIDDEN_ACCEPTED = "HIDDEN_ACCEPTED"


class FieldClass(str, Enum):
    FIELD_ACCEPTED = "FIELD_ACCEPTED"
    FIELD_REJECTED = "FIELD_REJECTED"


BitKey = tuple[int, int, str, int]  # leaf, KVM index, register, bit


@dataclass(frozen=True)
class BitResult:
    leaf: int
    subleaf: int  # the index KVM reports (0 for rows without sub-leaves)
    register: str
    bit: int
    name: str
    cls: BitClass
    outcome: Outcome | None  # the INIT_VM that decided; None when inferred by splitting
    # Why a REPORTED_REJECTED or HIDDEN_ACCEPTED is not a kernel bug (a module rule).
    explained: str | None = None
    expected: BitClass | None = None  # the mirror's class, when the model is known
    # An accepted bit the TD does not get as asked, and the module's reason ("accepted,
    # cleared": a feature whose XSAVE state XFAM lacks, PKS set from ATTRIBUTES.PKS...).
    cleared: str | None = None
    # probe --effective: whether the TD's CPUID (KVM_TDX_GET_CPUID) had the accepted bit,
    # "present" or "cleared" (observed, where `cleared` is the module model's reason).
    effective: str | None = None

    @property
    def label(self) -> str:
        """The class as people read it; an accepted bit is split by what the TD got."""
        if self.effective is not None and self.cls in (BitClass.REPORTED_ACCEPTED,
                                                       BitClass.HIDDEN_ACCEPTED):
            return f"{self.cls.value} (accepted, {self.effective})"
        return self.cls.value

    @property
    def key(self) -> BitKey:
        return (self.leaf, self.subleaf, self.register, self.bit)

    @property
    def reported(self) -> bool:
        return self.cls in (BitClass.REPORTED_ACCEPTED, BitClass.REPORTED_REJECTED)

    @property
    def failed(self) -> bool:
        bad = self.cls in (BitClass.REPORTED_REJECTED, BitClass.HIDDEN_ACCEPTED)
        return bad and self.explained is None


@dataclass(frozen=True)
class FieldResult:
    leaf: int
    subleaf: int
    register: str
    lo: int
    hi: int
    name: str
    value: int  # the register value tried (field bits only)
    cls: FieldClass
    outcome: Outcome | None
    # Host-dependent tries (GPAW 52 needs 5-level EPT) inform but never fail.
    informational: bool = False

    @property
    def failed(self) -> bool:
        return self.cls is FieldClass.FIELD_REJECTED and not self.informational


@dataclass(frozen=True)
class TrapResult:
    """Hidden leaf-7.0 bits KVM refused when sent properly, steered onto row 7.0 through
    KVM's lookup (an unflagged entry at another index, the other leaf-7 rows taken by
    flagged entries: the trap verify's adversarial checks send).  A correct kernel refuses
    them again itself (KVM_REJECTED); anything else let them past KVM."""

    leaf: int
    subleaf: int
    register: str
    bits: tuple[int, ...]
    names: tuple[str, ...]
    request: Request
    outcome: Outcome | None  # None: not sent (the --max-tds budget ran out)

    @property
    def failed(self) -> bool:
        return self.outcome is not None and self.outcome.kind is not Kind.KVM_REJECTED


@dataclass
class ProbeResult:
    backend: str
    mode: str
    complete: bool
    tds: int
    ioctls: int
    seconds: float
    caps: Capabilities
    bits: list[BitResult]
    fields: list[FieldResult]
    untested: int  # feature bits of listed rows left out (targeted mode, --max-tds)
    module: str | None = None
    policy: str | None = None
    notes: list[str] = field(default_factory=list)
    knowledge: Knowledge | None = None  # what the run was judged by, and why
    traps: list[TrapResult] = field(default_factory=list)

    @property
    def failures(self) -> list[BitResult | FieldResult | TrapResult]:
        out: list[BitResult | FieldResult | TrapResult] = [b for b in self.bits if b.failed]
        out.extend(f for f in self.fields if f.failed)
        out.extend(t for t in self.traps if t.failed)
        return out

    @property
    def verdict(self) -> Status:
        """A kernel bug fails; so does a run cut short, which decided only part of what it
        set out to (it must not pass on what it never tried)."""
        return Status.FAIL if self.failures or not self.complete else Status.PASS

    @property
    def mismatches(self) -> list[BitResult]:
        return [b for b in self.bits if b.expected is not None and b.expected is not b.cls]

    def counts(self) -> dict[str, int]:
        out = {c.value: 0 for c in BitClass}
        for b in self.bits:
            out[b.cls.value] += 1
        return out

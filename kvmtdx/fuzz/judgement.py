"""What a scenario's calls answered, and how each answer departs from the prediction: the
types the judge (kvmtdx.fuzz.judge) works with, without the judging.  Pure data."""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from enum import Enum

from kvmtdx.model import invariant
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.outcome import Outcome
from kvmtdx.status import errno_name
from kvmtdx.structs import CpuidEntry


@dataclass(frozen=True, slots=True)
class Model:
    """What the answers are predicted by: the module, host and policy of the run, and what
    the kernel reported (the invariant's "reported").  `host_exact` is False for a host
    inferred from the capabilities: what it cannot know (5-level EPT, the CPU's own CPUID
    bits) is not judged."""

    module: ModuleProfile
    host: Host
    policy: Policy
    reported: tuple[CpuidEntry, ...]
    host_exact: bool = True

    @property
    def closed(self) -> Policy | None:
        return invariant.hole_closed(self.policy)


@dataclass(frozen=True, slots=True)
class CapsAnswer:
    """KVM_TDX_CAPABILITIES as the caller saw it afterwards."""

    errno: int
    buffer: bytes


@dataclass(frozen=True, slots=True)
class CpuidRead:
    """One KVM_TDX_GET_CPUID as the caller saw it afterwards: its errno and the buffer."""

    errno: int
    buffer: bytes


@dataclass(frozen=True, slots=True)
class VcpuAnswer:
    """What the vCPU path answered (scenario.VcpuCall), each ioctl's errno; None: not sent
    (no vCPU to send it to, no CPUID read to hand KVM_SET_CPUID2)."""

    split_irqchip: int | None
    create_vcpu: int | None
    reads: tuple[CpuidRead, ...] = ()  # the drawn room, then (after E2BIG) the count told
    set_cpuid2: int | None = None

    @property
    def refused_by_backend(self) -> str | None:
        """The first vCPU-path ioctl the backend has no handler for (ENOTTY: the
        kernel-source host runs only KVM's VM-level TDX code), as "IOCTL: ENOTTY"."""
        for name, err in ((SPLIT_IRQCHIP, self.split_irqchip),
                          ("KVM_CREATE_VCPU", self.create_vcpu)):
            if err == _errno.ENOTTY:
                return f"{name}: ENOTTY"
        return None


SPLIT_IRQCHIP = "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"
Answer = Outcome | CapsAnswer | VcpuAnswer


@dataclass(frozen=True, slots=True)
class Observed:
    """What the backend did with a scenario: each call's answer, the key IDs the TD held after
    each call and after it was closed, and the kernel WARNs each INIT_VM provoked (None:
    the backend does not say)."""

    answers: tuple[Answer, ...]
    held: tuple[int | None, ...]
    held_after_close: int | None
    warned: tuple[int | None, ...] = ()

    def warned_at(self, k: int) -> int | None:
        return self.warned[k] if k < len(self.warned) else None


class Call(str, Enum):
    """Which answer departs from the prediction."""

    INIT_VM = "init_vm"
    CAPABILITIES = "capabilities"
    KEY_IDS = "key_ids"
    KERNEL_WARN = "kernel_warn"
    VCPU = "vcpu"  # KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP), KVM_CREATE_VCPU
    GET_CPUID = "get_cpuid"  # KVM_TDX_GET_CPUID's errno and what it wrote where
    TD_CPUID = "td_cpuid"  # the entries KVM_TDX_GET_CPUID gave: the TD's CPUID
    SET_CPUID2 = "set_cpuid2"


class Verdict(str, Enum):
    STRICTER = "stricter"
    DIFFERS = "differs"
    BREAKS_INVARIANT = "breaks_invariant"

    @property
    def fails(self) -> bool:
        return self is not Verdict.STRICTER


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """One answer that is not the prediction.  `group` is what findings are told apart by:
    the call, the verdict, the mirror's deciding check and who decides, the observed kind and
    errno (a finding is the smallest scenario of its group)."""

    step: int  # the call's position in the scenario (its length: after the TD was closed)
    call: Call
    verdict: Verdict
    expected: str
    actual: str
    group: tuple[str, ...]
    predicted: Outcome | None = None  # an INIT_VM's (the vCPU path's: the accepted one's)
    observed: Outcome | None = None
    note: str = ""


def errno_text(err: int | None) -> str:
    """An ioctl's errno as a finding says it: "success", "-EINVAL", or (None) "not sent"."""
    return "not sent" if err is None else "success" if not err else f"-{errno_name(err)}"


@dataclass(frozen=True, slots=True)
class Judgement:
    departures: tuple[Discrepancy, ...]  # STRICTER ones, then at most one that fails
    unjudged: str | None = None  # why judging stopped early (no free key ID)
    vcpu_refused: str | None = None  # the backend answers no vCPU ioctl: not judged

    @property
    def worst(self) -> Discrepancy | None:
        return self.departures[-1] if self.departures else None


class Unjudged(Exception):
    """The rest of a scenario cannot be judged (no free key ID, a fact of an inferred host)."""

"""What a scenario's calls answered, and how each answer departs from the prediction: the
types the judge (kvmtdx.fuzz.judge) works with, without the judging.  Pure data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from kvmtdx.model import invariant
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile, Regs
from kvmtdx.outcome import Outcome
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


Answer = Outcome | CapsAnswer


@dataclass(frozen=True, slots=True)
class TdCpuid:
    """The TD's CPUID as TDH.MNG.INIT left it (TDCS CPUID_VALUES), and its leaves whose
    CPUID_VALID is 0 (a #VE for the guest)."""

    values: Mapping[tuple[int, int | None], Regs]
    faulting: frozenset[tuple[int, int | None]] = frozenset()


@dataclass(frozen=True, slots=True)
class Observed:
    """What the backend did with a scenario: each call's answer, the key IDs the TD held after
    each call and after it was closed, the kernel WARNs each INIT_VM provoked, and the TD's
    CPUID after one it accepted (None: the backend does not say; only the simulated host
    shows a TD's CPUID, a real kernel needs a vCPU and KVM_TDX_GET_CPUID for it)."""

    answers: tuple[Answer, ...]
    held: tuple[int | None, ...]
    held_after_close: int | None
    warned: tuple[int | None, ...] = ()
    cpuid: tuple[TdCpuid | None, ...] = ()

    def warned_at(self, k: int) -> int | None:
        return self.warned[k] if k < len(self.warned) else None

    def cpuid_at(self, k: int) -> TdCpuid | None:
        return self.cpuid[k] if k < len(self.cpuid) else None


class Call(str, Enum):
    """Which answer departs from the prediction."""

    INIT_VM = "init_vm"
    CAPABILITIES = "capabilities"
    KEY_IDS = "key_ids"
    KERNEL_WARN = "kernel_warn"
    TD_CPUID = "td_cpuid"


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
    predicted: Outcome | None = None  # an INIT_VM's
    observed: Outcome | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Judgement:
    departures: tuple[Discrepancy, ...]  # STRICTER ones, then at most one that fails
    unjudged: str | None = None  # why judging stopped early (no free key ID)

    @property
    def worst(self) -> Discrepancy | None:
        return self.departures[-1] if self.departures else None


class Unjudged(Exception):
    """The rest of a scenario cannot be judged (no free key ID, a fact of an inferred host)."""

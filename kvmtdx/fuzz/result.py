"""What a fuzz run found and did, without JSON (kvmtdx.report.fuzz writes it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from kvmtdx.fuzz.judge import Discrepancy, Verdict
from kvmtdx.fuzz.scenario import Scenario
from kvmtdx.knowledge import Knowledge
from kvmtdx.verdict import Status

# How a run shows it is alive on a terminal: TDs, INIT_VM calls, findings, seconds.
Progress = Callable[[int, int, int, float], None]


@dataclass(frozen=True, slots=True)
class Budget:
    """What bounds a run: TDs spent searching (shrinking a finding takes more) and seconds;
    with `first`, the first failing discrepancy ends the search too (once shrunk)."""

    max_tds: int
    seconds: float
    first: bool = False


class End(str, Enum):
    """Why a run stopped."""

    TDS = "tds"  # --max-tds spent
    TIME = "time"  # --time spent
    FOUND = "found"  # --first: a discrepancy
    INTERRUPTED = "interrupted"
    REPLAYED = "replayed"  # --replay: every file sent once


@dataclass(frozen=True, slots=True)
class Finding:
    """The smallest scenario seen for one group of discrepancies (judge.Discrepancy.group)."""

    scenario: Scenario  # the calls up to and including the one that departs
    discrepancy: Discrepancy
    found_after_tds: int  # TDs the run had created when it first saw the group
    found_after_seconds: float
    smallest_after_tds: int  # TDs the run had created when it reached the smallest scenario
    seen: int  # examples that showed the group
    reproduced: bool | None = None  # replayed once more at the end (None: not replayed)
    origin: str | None = None  # --replay: the file replayed


@dataclass(frozen=True, slots=True)
class VcpuStats:
    """The vCPU path's share of a run: scenarios that ended with it, KVM_TDX_GET_CPUID and
    KVM_SET_CPUID2 calls, and, where the backend answers no vCPU ioctl, which one said so
    (nothing of the path was judged then)."""

    steps: int = 0
    get_cpuid_calls: int = 0
    set_cpuid2_calls: int = 0
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class Stats:
    tds: int
    init_vm_calls: int
    caps_calls: int
    seconds: float
    examples: int  # scenarios run (every one a TD)
    unjudged: int  # scenarios whose judging stopped at ENOSPC
    end: End
    vcpu: VcpuStats = VcpuStats()

    @property
    def requests_per_second(self) -> float:
        """TDX calls a second: INIT_VM, KVM_TDX_CAPABILITIES and KVM_TDX_GET_CPUID."""
        calls = self.init_vm_calls + self.caps_calls + self.vcpu.get_cpuid_calls
        return calls / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class FuzzReport:
    backend: str
    knowledge: Knowledge
    seed: int | None  # None: --replay
    budget: Budget | None
    stats: Stats
    findings: tuple[Finding, ...]  # failing ones first (invariant broken, then differs)
    database: str | None  # where hypothesis keeps failing examples (None: nowhere)
    stricter_fails: bool = False  # --fail-on-stricter

    def failing(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if self._fails(f.discrepancy.verdict))

    def stricter(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.discrepancy.verdict is Verdict.STRICTER)

    def _fails(self, v: Verdict) -> bool:
        return v.fails or self.stricter_fails

    @property
    def status(self) -> Status:
        return Status.FAIL if self.failing() else Status.PASS

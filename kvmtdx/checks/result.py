"""What a verify run produces: one result per check, the counts, and the run's report.

Plain data: the report writers in `kvmtdx.report.verify` turn it into text, KTAP, JSON and
JUnit.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.knowledge import Knowledge
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.requests import Request
from kvmtdx.verdict import Status


@dataclass(frozen=True, slots=True)
class CheckResult:
    id: str
    group: str
    status: Status
    detail: str  # one line
    expected: str = ""
    actual: str = ""
    bits: tuple[BitRef, ...] = ()
    request: Request | None = None  # a failing INIT_VM check's request (init-vm replays it)
    request_note: str = ""  # where one INIT_VM on a fresh TD does not replay it
    seconds: float | None = None  # how long the check ran


@dataclass(frozen=True, slots=True)
class Summary:
    total: int
    passed: int
    failed: int
    skipped: int
    tds_created: int
    ioctls: int
    init_vm_calls: int
    fds_before: int
    fds_after: int
    rss_before: int
    rss_after: int
    info: int = 0  # informational results: run, recorded, judged by no rule (a pass)

    @property
    def verdict(self) -> Status:
        if self.failed:
            return Status.FAIL
        return Status.PASS if self.total else Status.SKIP


@dataclass(frozen=True, slots=True)
class VerifyReport:
    backend: str
    knowledge: Knowledge | None
    checks: tuple[CheckResult, ...]
    summary: Summary
    skip_reason: str | None = None  # TDX not present: the whole suite skipped

    @property
    def verdict(self) -> Status:
        return Status.SKIP if self.skip_reason is not None else self.summary.verdict

    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.status == Status.FAIL)

"""The status of a check, a probed bit or a fuzz finding, and the exit code of a verdict."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from kvmtdx.errors import ExitCode


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    # Ran and recorded what the kernel did where no rule says what it must do (a question a
    # series leaves open): a pass for every verdict, reported apart.
    INFO = "info"

    def __str__(self) -> str:
        return self.value


def overall(statuses: Iterable[Status]) -> Status:
    """Fail if anything failed; pass if anything ran (an informational result counts as run);
    skip when nothing did."""
    seen = set(statuses)
    if Status.FAIL in seen:
        return Status.FAIL
    return Status.PASS if seen & {Status.PASS, Status.INFO} else Status.SKIP


def exit_code(verdict: Status) -> ExitCode:
    return {Status.PASS: ExitCode.PASS, Status.FAIL: ExitCode.FAIL,
            Status.SKIP: ExitCode.SKIP, Status.INFO: ExitCode.PASS}[verdict]

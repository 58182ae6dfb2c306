"""Every error kvmtdx raises on purpose, and the exit code each one means, in one place.

Exit codes follow kselftest: 0 every check passed, 1 something failed, 4 skipped
(TDX not present here), 2 bad usage or input.  An interrupted run exits as a
shell reports a signal death: 128 + the signal number.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    PASS = 0
    FAIL = 1
    USAGE = 2
    SKIP = 4
    INTERRUPTED = 130  # SIGINT
    TERMINATED = 143  # SIGTERM


class KvmtdxError(Exception):
    """Base of kvmtdx's own errors: a message fit for one line on stderr, and an exit code."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAIL

    @property
    def code(self) -> ExitCode:
        return self.exit_code

    @property
    def label(self) -> str:
        """How the one line starts: 'skip' for exit 4, else 'error'."""
        return "skip" if self.code == ExitCode.SKIP else "error"


class DataError(KvmtdxError, ValueError):
    """A file or option the user gave is unreadable or malformed.

    The message names the file (or option) and the field, fit for one line.
    """

    exit_code = ExitCode.USAGE


class MissingExtra(KvmtdxError):
    """An optional dependency a command needs is not installed (the message names the pip
    extra that brings it)."""

    exit_code = ExitCode.USAGE


class KvmError(KvmtdxError):
    """/dev/kvm or TDX is not usable here.  `skip` means "not present" (exit 4), else a failure."""

    def __init__(self, reason: str, *, skip: bool, errno_: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.skip = skip
        self.errno = errno_

    @property
    def code(self) -> ExitCode:
        return ExitCode.SKIP if self.skip else ExitCode.FAIL


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as SIGINT raises KeyboardInterrupt, so every
    handle's context manager runs on the way out (exit 143)."""


class ProbeError(KvmtdxError):
    """A probe could not go on (TDX key IDs exhausted by another holder, ...)."""


def exit_code_of(error: BaseException) -> ExitCode:
    """The exit code for an error that reached the command line."""
    if isinstance(error, KvmtdxError):
        return error.code
    if isinstance(error, Terminated):
        return ExitCode.TERMINATED
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.FAIL

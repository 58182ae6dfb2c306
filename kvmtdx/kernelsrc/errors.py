"""The one error the kernel-source backend raises: one line, and exit 4 or 2."""

from __future__ import annotations

from kvmtdx.errors import ExitCode, KvmtdxError


class KernelSourceError(KvmtdxError):
    """The tree, a patch or the compiler cannot give a backend.

    `missing`: something is not present here (no C compiler, no TDX code in
    the tree, no patch tool): exit 4, as for a host without TDX.  Otherwise
    the input is at fault (a tree that is not a tree, a patch that does not
    apply, a function a series renamed or that does not compile): exit 2.
    """

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing

    @property
    def code(self) -> ExitCode:
        return ExitCode.SKIP if self.missing else ExitCode.USAGE

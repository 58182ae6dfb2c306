"""The kvmtdx command line: parse, call, render, exit.  Nothing else lives here.

One module per command (each defines COMMAND: its arguments and how it runs);
COMMANDS lists them in the order `kvmtdx --help` shows.  Adding a command is a
new module and one line here.  Exit codes follow kselftest: 0 all passed,
1 something failed, 4 skipped (TDX not present), 2 usage or input errors; an
error that reaches `main` gets its code from kvmtdx.errors.exit_code_of.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

from kvmtdx import __version__
from kvmtdx.cli import (
    caps,
    diff,
    explain,
    fuzz,
    info,
    init_vm,
    options,
    predict,
    probe,
    report,
    verify,
)
from kvmtdx.cli.common import Command, Parser, error_line, simulate_list
from kvmtdx.errors import KvmtdxError, Terminated, exit_code_of

COMMANDS: tuple[Command, ...] = (
    info.COMMAND,
    caps.COMMAND,
    predict.COMMAND,
    init_vm.COMMAND,
    verify.COMMAND,
    probe.COMMAND,
    fuzz.COMMAND,
    diff.COMMAND,
    explain.COMMAND,
    report.COMMAND,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kvmtdx",
        description=(
            "Check that a Linux kernel handles Intel TDX configurable CPUID bits exactly right: "
            "drive /dev/kvm (or a simulated TDX host) with KVM_TDX_CAPABILITIES and "
            "KVM_TDX_INIT_VM and compare every answer with an exact model of the kernel."
        ),
        epilog="exit codes: 0 passed, 1 failed, 2 usage or input error, 4 skipped (no TDX here)",
    )
    parser.add_argument("--version", action="version", version=f"kvmtdx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.description, epilog=c.epilog)
        c.arguments(p)
        p.set_defaults(run=c.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    with _sigterm_raises():
        try:
            args = build_parser().parse_args(argv)
            if getattr(args, "simulate", None) == "list":
                return simulate_list(args)
            options.check(args)
            code: int = args.run(args)
            return code
        except (KvmtdxError, OSError, KeyboardInterrupt) as e:
            sys.stderr.write(error_line(e))
            return exit_code_of(e)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread while main() runs, as SIGINT raises
    KeyboardInterrupt: a runner's timeout then closes every fd and TD on the way out
    instead of killing the process where it stands."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

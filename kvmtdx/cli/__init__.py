"""The kvmtdx command line: parse, call, render, exit.  Nothing else lives here.

One module per command (each defines COMMAND: its arguments and how it runs);
COMMANDS lists them in the order `kvmtdx --help` shows.  Adding a command is a
new module and one line here.  Exit codes follow kselftest: 0 all passed,
1 something failed, 4 skipped (TDX not present), 2 usage or input errors; an
error that reaches `main` gets its code from kvmtdx.errors.exit_code_of.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvmtdx import __version__
from kvmtdx.cli import caps, diff, info, init_vm, predict, probe, report, verify
from kvmtdx.cli.common import Command, Parser, error_line, simulate_list
from kvmtdx.errors import KvmtdxError, exit_code_of

COMMANDS: tuple[Command, ...] = (
    info.COMMAND,
    caps.COMMAND,
    predict.COMMAND,
    init_vm.COMMAND,
    verify.COMMAND,
    probe.COMMAND,
    diff.COMMAND,
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
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "simulate", None) == "list":
            return simulate_list(args)
        code: int = args.run(args)
        return code
    except (KvmtdxError, OSError, KeyboardInterrupt) as e:
        sys.stderr.write(error_line(e))
        return exit_code_of(e)

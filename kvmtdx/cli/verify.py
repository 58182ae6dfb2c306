"""`kvmtdx verify`: the conformance suite (exit 0 pass, 1 fail, 4 skip)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kvmtdx.cli.common import (
    SIM_HINT,
    Command,
    backend_options,
    given_from,
    model_options,
    open_session,
    output_options,
    say,
    write,
)
from kvmtdx.errors import DataError, ExitCode


def arguments(p: argparse.ArgumentParser) -> None:
    backend_options(p)
    model_options(p, "auto", auto=True)
    output_options(p, ("text", "json", "ktap", "junit"))
    g = p.add_argument_group("which checks")
    g.add_argument("--list-checks", action="store_true",
                   help="list the checks (id, group, description) and exit; with --check or "
                        "--group, the ones they select")
    g.add_argument("--check", action="append", default=[], metavar="ID",
                   help="run this check (repeatable; with the checks it judges)")
    g.add_argument("--group", action="append", default=[], metavar="NAME",
                   help="run this group's checks (repeatable)")
    p.add_argument("--save-failures", metavar="DIR",
                   help="write each failing INIT_VM check's request to DIR/CHECK_ID.json, "
                        "which 'kvmtdx init-vm --request' replays (DIR is created)")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvmtdx.checks import run_verify, select
    from kvmtdx.report import verify as render

    specs = select(args.check, args.group)
    if args.list_checks:
        write(args, render.render_check_list(specs, args.format))
        return ExitCode.PASS
    if args.save_failures:
        _check_directory(args.save_failures)
    backend = open_session(args)
    tty = sys.stderr.isatty()
    only = [s.id for s in specs] if args.check or args.group else None
    report = run_verify(backend.seam, backend_label=backend.label, only=only,
                        given=given_from(args, backend), progress=_progress() if tty else None)
    if tty:
        sys.stderr.write("\r\033[K")
    if report.skip_reason is not None:
        reason = f"{report.skip_reason}; {SIM_HINT}"
        report = replace(report, skip_reason=reason)
        if args.format != "text" or args.output:
            say("skip", reason)
    write(args, render.render(report, args.format))
    if args.save_failures:
        _save_failures(args.save_failures, render.failure_requests(report))
    return render.exit_code(report)


def _check_directory(path: str) -> None:
    """Before a run that may take minutes: DIR is, or can be made, a writable directory."""
    import os
    from pathlib import Path

    d = Path(path)
    where = d if d.exists() else d.parent
    if d.exists() and not d.is_dir():
        raise DataError(f"--save-failures {path}: not a directory")
    if not where.is_dir():
        raise DataError(f"--save-failures {path}: {where} does not exist")
    if not os.access(where, os.W_OK | os.X_OK):
        raise DataError(f"--save-failures {path}: {where} is not writable")


def _save_failures(path: str, requests: dict[str, str]) -> None:
    from pathlib import Path

    from kvmtdx.report import emit

    d = Path(path)
    d.mkdir(exist_ok=True)
    for check_id, text in requests.items():
        emit(text, str(d / f"{check_id}.json"))


def _progress() -> Callable[[int, int, int], None]:
    """Checks done / total and TDs created, redrawn on stderr at most ten times a second."""
    import time

    last = [0.0]

    def show(done: int, total: int, tds: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.1 or done == total:
            last[0] = now
            sys.stderr.write(f"\rverify: {done}/{total} checks, {tds} TDs created")
            sys.stderr.flush()
    return show


COMMAND = Command("verify", "the conformance suite (exit 0 pass, 1 fail, 4 skip)",
                  arguments, run)

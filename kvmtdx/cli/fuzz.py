"""`kvmtdx fuzz`: differential fuzzing against the mirror (exit 0 clean, 1 discrepancy)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvmtdx.cli.common import (
    JUDGED_BY,
    Command,
    backend_options,
    given_from,
    identity_of,
    model_options,
    open_session,
    output_directory,
    output_options,
    save,
    write,
)
from kvmtdx.cli.options import positive_int
from kvmtdx.errors import DataError, ExitCode

if TYPE_CHECKING:
    from kvmtdx.fuzz import FuzzReport, Progress
    from kvmtdx.identity import HostIdentity

# The default budget: every seeded bug of the simulated host is found well inside it
# (scripts/bench_fuzz.py measures how far inside), and it runs in seconds there.
DEFAULT_TDS = 6000
DEFAULT_SECONDS = 300.0

DESCRIPTION = (
    "Differential fuzzing: draw KVM_TDX_INIT_VM requests and KVM_TDX_CAPABILITIES calls from "
    "what the kernel reported (the CPUID lookup's flags, indexes, order, duplicates and "
    "strays; bits inside, hidden by KVM and outside what the module takes; attributes, XFAM, "
    "GPAW and value registers; the words KVM must refuse; a TD's history), and the vCPU path "
    "that reads the TD's CPUID (KVM_TDX_GET_CPUID, KVM_SET_CPUID2), hold every answer "
    "to the mirror's exact prediction, and shrink each discrepancy to a minimal request.  "
    "A kernel stricter than the model where the invariant allows it (spec section 5) is "
    "reported apart, not as a failure.  Needs hypothesis: pip install 'kvmtdx[fuzz]'.")
EPILOG = ("exit codes: 0 the budget ran out with no discrepancy, 1 a discrepancy, 2 usage or "
          "input error (or hypothesis missing), 4 no TDX here")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be above 0")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is 0 to 2**32-1")
    return value


def arguments(p: argparse.ArgumentParser) -> None:
    backend_options(p, judges_host=True)
    model_options(p, "auto", auto=True, **JUDGED_BY)
    output_options(p, ("text", "json"))
    g = p.add_argument_group("the search")
    g.add_argument("--seed", type=_seed, metavar="N",
                   help="the run's seed (default: a random one, printed): the same seed, "
                        "backend and database make the same run")
    g.add_argument("--max-tds", type=positive_int, metavar="N",
                   help=f"stop searching after N TDs (default {DEFAULT_TDS}); shrinking what "
                        "was found takes more, reported apart")
    g.add_argument("--time", type=_seconds, metavar="SECONDS",
                   help=f"stop searching after SECONDS (default {DEFAULT_SECONDS:g})")
    g.add_argument("--first", action="store_true",
                   help="stop searching at the first discrepancy (it is still shrunk)")
    g.add_argument("--fail-on-stricter", action="store_true",
                   help="count answers stricter than the model (which the invariant allows) "
                        "as failures")
    g.add_argument("--save", metavar="DIR", type=output_directory("--save"),
                   help="write each finding to DIR as a replay file: a request 'kvmtdx "
                        "init-vm --request' replays, or (with KVM_TDX_CAPABILITIES calls or the "
                        "vCPU path) a fuzz case 'kvmtdx fuzz --replay' replays (DIR is created)")
    db = g.add_mutually_exclusive_group()
    db.add_argument("--db", metavar="DIR", type=output_directory("--db"),
                    help="keep hypothesis's failing examples under DIR (default: the kvmtdx "
                         "cache directory), so a later run tries them first")
    db.add_argument("--no-db", action="store_true", help="keep no failing examples")
    g.add_argument("--replay", action="append", default=[], metavar="FILE",
                   help="no search: send each saved finding (a request or fuzz-case file) once "
                        "and judge it (repeatable); exit 1 while any still departs")


def run(args: argparse.Namespace) -> int:
    if args.replay:
        return _replay(args)
    from kvmtdx import fuzz

    fuzz.require_hypothesis()
    budget = fuzz.Budget(args.max_tds or DEFAULT_TDS, args.time or DEFAULT_SECONDS, args.first)
    options = fuzz.FuzzOptions(budget, _seed_of(args), _database(args), args.fail_on_stricter)
    backend = open_session(args)
    tty = sys.stderr.isatty()
    partial: list[FuzzReport] = []
    try:
        report = fuzz.run_fuzz(backend, given_from(args, backend), options,
                               progress=_progress() if tty else None, record=partial)
    except KeyboardInterrupt:
        _end_progress(tty)
        if partial:  # what was found before the interrupt is not lost
            _finish(args, partial[0], identity_of(backend, partial[0].knowledge))
        raise
    _end_progress(tty)
    _finish(args, report, identity_of(backend, report.knowledge))
    return ExitCode.FAIL if report.failing() else ExitCode.PASS


def _finish(args: argparse.Namespace, report: FuzzReport, identity: HostIdentity) -> None:
    from kvmtdx.report import fuzz as render

    write(args, render.render(report, args.format, identity), render.verdict_line(report))
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for name, text in render.replay_files(report).items():
            save(text, os.path.join(args.save, name), "--save")


def _replay(args: argparse.Namespace) -> int:
    from kvmtdx.fuzz import run_replay
    from kvmtdx.fuzz.replay import load_case

    searching = {"--seed": args.seed, "--max-tds": args.max_tds, "--time": args.time,
                 "--first": args.first or None, "--db": args.db, "--no-db": args.no_db or None}
    for option, value in searching.items():
        if value is not None:
            raise DataError(f"{option} has no effect with --replay, which sends saved cases "
                            "as they are, with no search")
    cases = [(path, load_case(path)) for path in args.replay]
    backend = open_session(args)
    report = run_replay(backend, given_from(args, backend), cases,
                        stricter_fails=args.fail_on_stricter)
    _finish(args, report, identity_of(backend, report.knowledge))
    return ExitCode.FAIL if report.failing() else ExitCode.PASS


def _seed_of(args: argparse.Namespace) -> int:
    if args.seed is not None:
        return int(args.seed)
    import secrets

    return secrets.randbelow(2**32)


def _database(args: argparse.Namespace) -> Path | None:
    from kvmtdx.fuzz import default_database

    if args.no_db:
        return None
    return Path(args.db) if args.db else default_database()


def _end_progress(tty: bool) -> None:
    if tty:
        sys.stderr.write("\r\033[K")


def _progress() -> Progress:
    """TDs, INIT_VM calls, findings and seconds, redrawn on stderr (the engine calls it at
    most ten times a second)."""
    def show(tds: int, calls: int, findings: int, seconds: float) -> None:
        sys.stderr.write(f"\rfuzz: {tds} TDs, {calls} INIT_VM, {findings} findings, "
                         f"{seconds:.0f} s")
        sys.stderr.flush()
    return show


COMMAND = Command("fuzz", "differential fuzzing against the mirror (exit 0 clean, 1 found)",
                  arguments, run, description=DESCRIPTION, epilog=EPILOG)

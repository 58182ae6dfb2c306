"""`kvmtdx verify`: the conformance suite (exit 0 pass, 1 fail, 4 skip)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kvmtdx.cli.common import (
    JUDGED_BY,
    SIM_HINT,
    Command,
    backend_options,
    given_from,
    interruption,
    model_options,
    open_session,
    output_options,
    say,
    write,
)


def arguments(p: argparse.ArgumentParser) -> None:
    backend_options(p, judges_host=True)
    model_options(p, "auto", auto=True, **JUDGED_BY)
    p.add_argument("--allow-kernel-warn", action="store_true",
                   help="on a real kernel, let init_vm_no_kernel_warn provoke the kernel WARN it "
                        "looks for (this taints the kernel; never done with "
                        "kernel.panic_on_warn=1); simulated backends always run it")
    output_options(p, ("text", "json", "ktap", "junit"))


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvmtdx.checks import CHECKS, CheckResult, run_verify
    from kvmtdx.report import verify as render

    backend = open_session(args)
    tty = sys.stderr.isatty()
    done: list[CheckResult] = []
    try:
        report = run_verify(backend.seam, backend_label=backend.label,
                            given=given_from(args, backend),
                            progress=_progress() if tty else None, record=done,
                            allow_kernel_warn=args.allow_kernel_warn)
    except KeyboardInterrupt as e:
        _end_progress(tty)
        if args.format == "ktap":  # a KTAP runner must see the run was cut short
            why = interruption(e)
            write(args, render.interrupted_ktap(done, len(CHECKS), backend.label, why),
                  f"{why.upper()} after {len(done)} of {len(CHECKS)} checks")
        raise
    _end_progress(tty)
    if report.skip_reason is not None:
        reason = f"{report.skip_reason}; {SIM_HINT}"
        report = replace(report, skip_reason=reason)
        if args.format != "text" and not args.output:
            say("skip", reason)
    write(args, render.render(report, args.format), render.verdict_line(report))
    return render.exit_code(report)


def _end_progress(tty: bool) -> None:
    if tty:
        sys.stderr.write("\r\033[K")


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

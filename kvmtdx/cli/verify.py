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
    identity_of,
    interruption,
    model_options,
    open_session,
    output_directory,
    output_options,
    save,
    say,
    write,
    write_also,
)
from kvmtdx.errors import ExitCode


def arguments(p: argparse.ArgumentParser) -> None:
    backend_options(p, judges_host=True)
    model_options(p, "auto", auto=True, **JUDGED_BY)
    p.add_argument("--allow-kernel-warn", action="store_true",
                   help="on a real kernel, let init_vm_no_kernel_warn provoke the kernel WARN it "
                        "looks for (this taints the kernel; never done with "
                        "kernel.panic_on_warn=1); simulated backends always run it")
    p.add_argument("--strict", action="store_true",
                   help="judge what the series leaves open instead of recording it: "
                        "set_cpuid2_consistency fails when KVM_SET_CPUID2 takes a CPUID unlike "
                        "the TD's (for kernels that claim to validate it)")
    output_options(p, ("text", "json", "ktap", "junit"), also=True)
    g = p.add_argument_group("which checks")
    g.add_argument("--list-checks", action="store_true",
                   help="list the checks (id, group, description) and exit; with --check or "
                        "--group, the ones they select")
    g.add_argument("--check", action="append", default=[], metavar="ID",
                   help="run this check (repeatable; with the checks it judges)")
    g.add_argument("--group", action="append", default=[], metavar="NAME",
                   help="run this group's checks (repeatable)")
    p.add_argument("--save-failures", metavar="DIR", type=output_directory("--save-failures"),
                   help="write each failing INIT_VM check's request to DIR/CHECK_ID.json, "
                        "which 'kvmtdx init-vm --request' replays (DIR is created)")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvmtdx.checks import CheckResult, run_verify, select
    from kvmtdx.report import verify as render

    specs = select(args.check, args.group)
    if args.list_checks:
        write(args, render.render_check_list(specs, args.format), f"{len(specs)} checks listed")
        return ExitCode.PASS
    backend = open_session(args)
    tty = sys.stderr.isatty()
    only = [s.id for s in specs] if args.check or args.group else None
    done: list[CheckResult] = []
    try:
        report = run_verify(backend.seam, backend_label=backend.label, only=only,
                            given=given_from(args, backend),
                            progress=_progress() if tty else None, record=done,
                            allow_kernel_warn=args.allow_kernel_warn, strict=args.strict)
    except KeyboardInterrupt as e:
        _end_progress(tty)
        if args.format == "ktap":  # a KTAP runner must see the run was cut short
            why = interruption(e)
            write(args, render.interrupted_ktap(done, len(specs), backend.label, why),
                  f"{why.upper()} after {len(done)} of {len(specs)} checks")
        raise
    _end_progress(tty)
    if report.skip_reason is not None:
        reason = f"{report.skip_reason}; {SIM_HINT}"
        report = replace(report, skip_reason=reason)
        if args.format != "text" and not args.output:
            say("skip", reason)
    identity = identity_of(backend, report.knowledge)
    write(args, render.render(report, args.format, identity), render.verdict_line(report))
    write_also(args, lambda fmt: render.render(report, fmt, identity))
    if args.save_failures:
        _save_failures(args.save_failures, render.failure_requests(report))
    return render.exit_code(report)


def _end_progress(tty: bool) -> None:
    if tty:
        sys.stderr.write("\r\033[K")


def _save_failures(path: str, requests: dict[str, str]) -> None:
    import os

    os.makedirs(path, exist_ok=True)
    for check_id, text in requests.items():
        save(text, os.path.join(path, f"{check_id}.json"), "--save-failures")


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

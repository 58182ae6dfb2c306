"""`kvmtdx probe`: every configurable bit classified by real INIT_VM outcomes."""

from __future__ import annotations

import argparse
import sys

from kvmtdx.cli.common import (
    JUDGED_BY,
    Command,
    backend_options,
    given_from,
    identity_of,
    model_options,
    open_session,
    output_file,
    output_options,
    save,
    write,
    write_also,
)
from kvmtdx.cli.options import positive_int
from kvmtdx.errors import ProbeError

DESCRIPTION = (
    "Classify every bit of every row KVM_TDX_CAPABILITIES lists by real "
    "KVM_TDX_INIT_VM outcomes: REPORTED_ACCEPTED, REPORTED_REJECTED, "
    "HIDDEN_KVM_REJECTED, HIDDEN_MODULE_REJECTED, HIDDEN_ACCEPTED.  Reported "
    "bits are tried in groups, hidden bits one per TD; then each hidden leaf-7.0 "
    "bit KVM refused is steered onto its row through KVM's lookup (a lookup "
    "trap), which KVM must refuse too.")
EPILOG = (
    "exit codes: 0 every probed bit behaves as it should and KVM refuses every "
    "lookup trap, 1 a REPORTED_REJECTED no module coupling explains, a "
    "HIDDEN_ACCEPTED, a lookup trap past KVM, or a run cut short by --max-tds "
    "(INCOMPLETE: it decided only part of the bits), 2 usage or input error, 4 no "
    "TDX here.")


def arguments(p: argparse.ArgumentParser) -> None:
    backend_options(p, judges_host=True)
    model_options(p, "auto", auto=True, **JUDGED_BY)
    p.add_argument("--exhaustive", action="store_true",
                   help="every bit of every listed row (the default without a module profile; "
                        "with one, the default tries the bits whose class can differ between "
                        "policies or between KVM and the module, plus a fixed sample)")
    p.add_argument("--max-tds", type=positive_int, metavar="N",
                   help="create at most N TDs (the report says when it is incomplete)")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="TDs in parallel (real device; the simulated host runs one ioctl at a "
                        "time)")
    p.add_argument("--effective", action="store_true",
                   help="read the TD's CPUID back (KVM_TDX_GET_CPUID) after the accepted bits' "
                        "requests: each accepted bit is 'accepted, present' or 'accepted, "
                        "cleared' by observation (one TD for the reported bits, one per hidden "
                        "accepted bit)")
    p.add_argument("--emit-allowlist", metavar="FILE", type=output_file("--emit-allowlist"),
                   help="write the effective allowlist the probe found, loadable with "
                        "--allowlist (bits it never tried are listed apart, under 'untried')")
    output_options(p, ("text", "json", "ktap", "junit"), also=True)


def run(args: argparse.Namespace) -> int:
    import datetime

    from kvmtdx import probe, verdict
    from kvmtdx.probe.allowlist import note_untried
    from kvmtdx.report import probe as render

    backend = open_session(args)
    known = given_from(args, backend)
    tty = sys.stderr.isatty()
    options = probe.ProbeOptions(exhaustive=args.exhaustive, max_tds=args.max_tds,
                                 effective=args.effective,
                                 jobs=args.jobs, progress=_progress if tty else None)
    try:
        result = probe.probe(backend.seam, options, label=backend.label, given=known)
    except ProbeError:
        _end_progress(tty)  # before the error line main() writes
        raise
    _end_progress(tty)
    if args.emit_allowlist:
        note_untried(result, args.emit_allowlist)
    identity = identity_of(backend, result.knowledge)
    # The report first: a side file that cannot be written must not take it along.
    write(args, render.render(result, args.format, identity), render.verdict_line(result))
    write_also(args, lambda fmt: render.render(result, fmt, identity))
    if args.emit_allowlist:
        save(render.allowlist_text(result, datetime.date.today().isoformat()),
             args.emit_allowlist, "--emit-allowlist")
    return verdict.exit_code(result.verdict)


def _end_progress(tty: bool) -> None:
    if tty:
        sys.stderr.write("\n")


def _progress(tds: int) -> None:
    sys.stderr.write(f"\rkvmtdx probe: {tds} TDs")
    sys.stderr.flush()


COMMAND = Command("probe", "classify every configurable bit by real INIT_VM outcomes",
                  arguments, run, description=DESCRIPTION, epilog=EPILOG)

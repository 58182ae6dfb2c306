"""`kvmtdx probe`: every configurable bit classified by real INIT_VM outcomes."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

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
from kvmtdx.errors import DataError, ExitCode, ProbeError

if TYPE_CHECKING:
    from kvmtdx.probe import ProbeResult

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
    p.add_argument("--max-tds", type=int, metavar="N",
                   help="create at most N TDs (the report says when it is incomplete)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
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
    from kvmtdx.probe.allowlist import untried_bits
    from kvmtdx.report import probe as render
    from kvmtdx.report import probe_cases as cases

    if args.jobs < 1:
        raise DataError("--jobs must be at least 1")
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
    code = verdict.exit_code(result.verdict)
    if args.emit_allowlist:
        untried = untried_bits(result)
        if untried:
            n = sum(bin(m).count("1") for m in untried.values())
            result.notes.append(f"{args.emit_allowlist}: {n} bits never tried are listed under "
                                "'untried', not in 'allowed' (no evidence KVM blocks them)")
    identity = identity_of(backend, result.knowledge)
    renderers = {"text": render.render_text, "ktap": cases.render_ktap,
                 "junit": cases.render_junit}

    def rendered(fmt: str) -> str:
        return render.render_json(result, identity) if fmt == "json" \
            else renderers[fmt](result)
    # The report first: a side file that cannot be written must not take it along.
    write(args, rendered(args.format), _verdict(result, code))
    write_also(args, rendered)
    if args.emit_allowlist:
        save(render.allowlist_text(result, datetime.date.today().isoformat()),
             args.emit_allowlist, "--emit-allowlist")
    return code


def _verdict(result: ProbeResult, code: ExitCode) -> str:
    done = "" if result.complete else ", incomplete"
    return (f"{'FAIL' if code else 'PASS'} ({len(result.bits)} bits, {len(result.failures)} "
            f"failing, {result.tds} TDs{done})")


def _end_progress(tty: bool) -> None:
    if tty:
        sys.stderr.write("\n")


def _progress(tds: int) -> None:
    sys.stderr.write(f"\rkvmtdx probe: {tds} TDs")
    sys.stderr.flush()


COMMAND = Command("probe", "classify every configurable bit by real INIT_VM outcomes",
                  arguments, run, description=DESCRIPTION, epilog=EPILOG)

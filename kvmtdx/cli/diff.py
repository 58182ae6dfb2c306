"""`kvmtdx diff`: what changed between two reports, or between two policies (exit as diff(1))."""

from __future__ import annotations

import argparse

from kvmtdx.cli.common import HOST_FORMS, HOST_METAVAR, Command, output_options, policy_from, write
from kvmtdx.errors import DataError, ExitCode

DESCRIPTION = (
    "kvmtdx diff A.json B.json: the bits whose class or reported state "
    "changed between two probe, verify, caps or predict JSON reports, and "
    "between two verify reports every check whose status changed.  "
    "kvmtdx diff --module M --policy A --policy B: the bits TDs can no longer "
    "be given under B, and those they newly can, by the mirror.")
EPILOG = (
    "exit codes, as diff(1): 0 no differences, 1 differences, 2 usage or input "
    "error (an unreadable or wrong-shaped file)")


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", metavar="A.json B.json",
                   help="two kvmtdx JSON reports (probe, verify, caps or predict) to compare")
    p.add_argument("--module", metavar="NAME|FILE",
                   help="for a policy diff: the TDX module profile (1.5.01, 1.5-late, 2.0 or "
                        "a JSON file)")
    p.add_argument("--policy", action="append", metavar="P",
                   help="give twice: compare what two kernel policies (upstream-6.16, upstream, "
                        "rfc-v2) let TDs have")
    p.add_argument("--host", metavar=HOST_METAVAR,
                   help=f"for a policy diff: the host CPU's native CPUID: {HOST_FORMS} "
                        "(default: max)")
    p.add_argument("--allowlist", metavar="FILE",
                   help="for a policy diff with rfc-v2: the kernel's allowlist (JSON), "
                        "replacing the bundled table")
    output_options(p, ("text", "json"))


def run(args: argparse.Namespace) -> int:
    from kvmtdx import diff
    from kvmtdx.model.profiles import load_profile
    from kvmtdx.native import host_by_name
    from kvmtdx.report import diff as render
    from kvmtdx.report.snapshot import load_snapshot

    result: diff.FileDiff | diff.PolicyDiff
    if args.policy or args.module:
        if args.files:
            raise DataError("diff takes either two JSON files or --module M --policy A --policy B")
        if not args.module or not args.policy or len(args.policy) != 2:
            raise DataError("a policy diff needs --module M and --policy given twice "
                            "(e.g. --policy upstream --policy rfc-v2)")
        result = diff.diff_policies(load_profile(args.module), host_by_name(args.host or "max"),
                                    policy_from(args, args.policy[0]),
                                    policy_from(args, args.policy[1]))
        differs = result.differs
        said = (f"{len(result.no_longer)} bits no longer available, {len(result.newly)} "
                "newly available")
    else:
        if len(args.files) != 2:
            raise DataError("diff needs two JSON files (probe, verify, caps or predict reports), "
                            "or --module M --policy A --policy B")
        result = diff.diff_files(load_snapshot(args.files[0]), load_snapshot(args.files[1]))
        differs = result.count > 0
        said = f"{result.count} differences" if differs else "no differences"
    write(args, render.render(result, args.format), said)
    return ExitCode.FAIL if differs else ExitCode.PASS


COMMAND = Command("diff", "what changed between two runs, or two policies", arguments, run,
                  description=DESCRIPTION, epilog=EPILOG)

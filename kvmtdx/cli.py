"""The kvmtdx command line: parse, call, render, exit.  Nothing else lives here.

Exit codes follow kselftest: 0 all passed, 1 something failed, 4 skipped
(TDX not present), and 2 for usage or input errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kvmtdx import __version__
from kvmtdx.errors import DataError, ExitCode, KvmError, ProbeError

if TYPE_CHECKING:
    from kvmtdx.knowledge import Given
    from kvmtdx.session import Backend
    from kvmtdx.structs import Capabilities

SIM_HINT = (
    "run the same against the simulated host with --simulate MODULE[:POLICY] "
    "(see --simulate list)"
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"kvmtdx: error: {message} (see kvmtdx --help)\n")
        raise SystemExit(ExitCode.USAGE)


def _backend_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to talk to")
    g.add_argument("--simulate", metavar="MODULE[:POLICY[:MUTANT]]",
                   help="use the simulated TDX host instead of /dev/kvm "
                        "(default policy 'upstream'; 'list' prints the choices)")
    g.add_argument("--backend", metavar="package.module:factory",
                   help="use a syscall seam of your own (open/ioctl/close)")
    g.add_argument("--host", metavar="FILE|max",
                   help="native CPUID of the simulated host (default: max, every feature)")


def _model_opts(p: argparse.ArgumentParser, policy_default: str | None, auto: bool = False) -> None:
    g = p.add_argument_group("what the kernel should do")
    g.add_argument("--module", metavar="NAME|FILE",
                   help="TDX module profile: 1.5.01, 1.5-late, 2.0, or a JSON file")
    choices = ["upstream-6.16", "upstream", "rfc-v2"] + (["auto"] if auto else [])
    g.add_argument("--policy", choices=choices, default=policy_default,
                   help=f"kernel policy (default: {policy_default})")
    g.add_argument("--allowlist", metavar="FILE",
                   help="the tested kernel's allowlist as JSON (replaces the bundled rfc-v2 table)")


def _output_opts(p: argparse.ArgumentParser, formats: Sequence[str]) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=list(formats), default="text")
    g.add_argument("--output", metavar="FILE", help="write the report here (atomically)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvmtdx",
        description=(
            "Check that a Linux kernel handles Intel TDX configurable CPUID bits exactly right: "
            "drive /dev/kvm (or a simulated TDX host) with KVM_TDX_CAPABILITIES and "
            "KVM_TDX_INIT_VM and compare every answer with an exact model of the kernel."
        ),
        epilog="exit codes: 0 passed, 1 failed, 2 usage or input error, 4 skipped (no TDX here)",
    )
    parser.add_argument("--version", action="version", version=f"kvmtdx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("info", help="the environment: /dev/kvm, VM types, whether TDX is usable")
    _backend_opts(p)
    _output_opts(p, ("text", "json"))

    p = sub.add_parser("caps", help="KVM_TDX_CAPABILITIES, decoded bit by bit")
    _backend_opts(p)
    _model_opts(p, None)
    p.add_argument("--save-module", metavar="FILE",
                   help="write the module profile these capabilities imply (needs --policy)")
    _output_opts(p, ("text", "json"))

    p = sub.add_parser("predict", help="the mirror's prediction of capabilities (and of INIT_VM)")
    p.add_argument("--host", metavar="FILE|max|native", default="max",
                   help="the host's native CPUID (default: max)")
    _model_opts(p, "upstream")
    p.add_argument("--request", metavar="FILE", help="an INIT_VM request (JSON) to predict")
    _output_opts(p, ("text", "json"))

    p = sub.add_parser("init-vm", help="one KVM_TDX_INIT_VM on a fresh TD; outcome as JSON")
    _backend_opts(p)
    p.add_argument("--allowlist", metavar="FILE", help="allowlist of the simulated rfc-v2 kernel")
    # Required, but checked in the handler so that --simulate list works here too.
    p.add_argument("--request", metavar="FILE", help="the request (JSON); required")
    _output_opts(p, ("json", "text"))
    p.set_defaults(format="json")

    p = sub.add_parser("verify", help="the conformance suite (exit 0 pass, 1 fail, 4 skip)")
    _backend_opts(p)
    _model_opts(p, "auto", auto=True)
    _output_opts(p, ("text", "json", "ktap", "junit"))

    p = sub.add_parser(
        "probe", help="classify every configurable bit by real INIT_VM outcomes",
        description="Classify every bit of every row KVM_TDX_CAPABILITIES lists by real "
                    "KVM_TDX_INIT_VM outcomes: REPORTED_ACCEPTED, REPORTED_REJECTED, "
                    "HIDDEN_KVM_REJECTED, HIDDEN_MODULE_REJECTED, HIDDEN_ACCEPTED.  Reported "
                    "bits are tried in groups, hidden bits one per TD.",
        epilog="exit codes: 0 every probed bit behaves as it should, 1 a REPORTED_REJECTED "
               "no module coupling explains or a HIDDEN_ACCEPTED (or the probe could not go "
               "on), 2 usage or input error, 4 no TDX here.  A run cut short by --max-tds "
               "is reported incomplete and judged on the bits it tried.")
    _backend_opts(p)
    _model_opts(p, "auto", auto=True)
    p.add_argument("--exhaustive", action="store_true",
                   help="every bit of every listed row (the default without a module profile; "
                        "with one, the default tries the bits whose class can differ between "
                        "policies or between KVM and the module, plus a fixed sample)")
    p.add_argument("--max-tds", type=int, metavar="N",
                   help="create at most N TDs (the report says when it is incomplete)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="TDs in parallel (real device; the simulated host runs one ioctl at a "
                        "time)")
    p.add_argument("--emit-allowlist", metavar="FILE",
                   help="write the effective allowlist, loadable with --allowlist")
    _output_opts(p, ("text", "json"))

    p = sub.add_parser(
        "diff", help="what changed between two runs, or two policies",
        description="kvmtdx diff A.json B.json: the bits whose class or reported state "
                    "changed between two probe, verify or caps JSON files.  "
                    "kvmtdx diff --module M --policy A --policy B: the bits TDs can no longer "
                    "be given under B, and those they newly can, by the mirror.",
        epilog="exit codes, as diff(1): 0 no differences, 1 differences, 2 usage or input "
               "error (an unreadable or wrong-shaped file)")
    p.add_argument("files", nargs="*", metavar="A.json B.json")
    p.add_argument("--module", metavar="NAME|FILE")
    p.add_argument("--policy", action="append", metavar="P",
                   help="give twice: compare what two kernel policies let TDs have")
    p.add_argument("--host", metavar="FILE|max", default="max")
    p.add_argument("--allowlist", metavar="FILE")
    _output_opts(p, ("text", "json"))
    return parser


def _session(args: argparse.Namespace) -> Backend:
    """The seam a command talks to, from --simulate / --backend / --host / --allowlist."""
    from kvmtdx.model.policy import load_allowlist
    from kvmtdx.native import host_by_name
    from kvmtdx.session import open_backend

    host_arg = getattr(args, "host", None)
    allow_arg = getattr(args, "allowlist", None)
    return open_backend(
        simulate=args.simulate,
        backend=args.backend,
        host=host_by_name(host_arg) if host_arg else None,
        allowlist=load_allowlist(allow_arg) if allow_arg else None,
    )


def _given(args: argparse.Namespace, backend: Backend) -> Given:
    """What --module, --host, --policy and --allowlist tell verify and probe."""
    from kvmtdx.knowledge import given

    return given(backend, module=args.module, host=args.host, policy=args.policy,
                 allowlist=args.allowlist)


def cmd_info(args: argparse.Namespace) -> int:
    from kvmtdx.hostinfo import gather_info
    from kvmtdx.report import emit
    from kvmtdx.report import info as render

    info = gather_info(_session(args))
    emit((render.render_json if args.format == "json" else render.render_text)(info),
         args.output)
    if info.tdx_available:
        return ExitCode.PASS
    if info.skip:
        sys.stderr.write(f"kvmtdx: skip: {info.reason}; {SIM_HINT}\n")
        return ExitCode.SKIP
    sys.stderr.write(f"kvmtdx: error: {info.reason}\n")
    return ExitCode.FAIL


def cmd_caps(args: argparse.Namespace) -> int:
    from kvmtdx.hostinfo import read_capabilities
    from kvmtdx.report import caps as render
    from kvmtdx.report import emit

    if args.save_module and not args.policy:
        raise DataError("--save-module needs --policy: the policy of the running kernel "
                        "(upstream-6.16, upstream or rfc-v2) says which bits it hides")
    backend = _session(args)
    reading = read_capabilities(backend)  # KvmError(skip) without TDX: main() exits 4
    fmt = render.render_json if args.format == "json" else render.render_text
    emit(fmt(reading.caps, backend.label, reading.counters), args.output)
    if args.save_module:
        _save_module(args, reading.caps, backend.label)
    return ExitCode.PASS


def _save_module(args: argparse.Namespace, caps: Capabilities, label: str) -> None:
    from kvmtdx.model.infer import module_from_capabilities
    from kvmtdx.model.policy import get_policy, load_allowlist
    from kvmtdx.model.profiles import load_profile, profile_to_json
    from kvmtdx.report import emit, to_json

    policy = get_policy(args.policy, load_allowlist(args.allowlist) if args.allowlist else None)
    base = load_profile(args.module) if args.module else None
    profile = module_from_capabilities(
        caps, policy, base=base, name=f"saved-{policy.name}",
        source=f"kvmtdx caps --save-module on {label}, policy {policy.name}"
        + (f", hidden bits filled from module {base.name}" if base else
           ", bits the policy hides marked unknown"))
    emit(to_json(profile_to_json(profile)), args.save_module)


def cmd_predict(args: argparse.Namespace) -> int:
    from kvmtdx.model import mirror
    from kvmtdx.model.policy import get_policy, load_allowlist
    from kvmtdx.model.profiles import load_profile
    from kvmtdx.model.requests import load_request
    from kvmtdx.native import host_by_name
    from kvmtdx.report import emit
    from kvmtdx.report import predict as render

    if not args.module:
        raise DataError("predict needs --module: 1.5.01, 1.5-late, 2.0 or a module JSON file")
    module = load_profile(args.module)
    host = host_by_name(args.host)
    policy = get_policy(args.policy, load_allowlist(args.allowlist) if args.allowlist else None)
    request = load_request(args.request) if args.request else None
    caps = mirror.predict_capabilities(module, host, policy, len(module.rows))
    outcome = None if request is None else mirror.predict_init_vm(module, host, policy, request)
    fmt = render.render_json if args.format == "json" else render.render_text
    emit(fmt(module, host, policy, caps, outcome), args.output)
    return ExitCode.PASS


def cmd_init_vm(args: argparse.Namespace) -> int:
    from kvmtdx.model.requests import load_request
    from kvmtdx.report import emit
    from kvmtdx.report import sim as render
    from kvmtdx.session import init_vm_once

    if not args.request:
        raise DataError("init-vm needs --request FILE (a KVM_TDX_INIT_VM request as JSON)")
    request = load_request(args.request)
    run = init_vm_once(_session(args), request)  # KvmError(skip) without TDX: exit 4
    emit((render.init_vm_json if args.format == "json" else render.init_vm_text)(run),
         args.output)
    return ExitCode.PASS


def _simulate_list(args: argparse.Namespace) -> int:
    from kvmtdx import sim
    from kvmtdx.report import emit
    from kvmtdx.report import sim as render

    fmt = render.choices_json if getattr(args, "format", "text") == "json" else render.choices_text
    emit(fmt(sim.choices()), getattr(args, "output", None))
    return ExitCode.PASS


def cmd_verify(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvmtdx.checks import run_verify
    from kvmtdx.report import emit
    from kvmtdx.report import verify as render

    backend = _session(args)
    report = run_verify(backend.seam, backend_label=backend.label, given=_given(args, backend),
                        progress=_progress() if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    if report.skip_reason is not None:
        report = replace(report, skip_reason=f"{report.skip_reason}; {SIM_HINT}")
        if args.format != "text" or args.output:
            sys.stderr.write(f"kvmtdx: skip: {report.skip_reason}\n")
    emit(render.render(report, args.format), args.output)
    return render.exit_code(report)


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


def cmd_probe(args: argparse.Namespace) -> int:
    import datetime

    from kvmtdx import probe
    from kvmtdx.report import emit
    from kvmtdx.report import probe as render

    if args.jobs < 1:
        raise DataError("--jobs must be at least 1")
    backend = _session(args)
    known = _given(args, backend)
    tty = sys.stderr.isatty()

    def progress(tds: int) -> None:
        sys.stderr.write(f"\rkvmtdx probe: {tds} TDs")
        sys.stderr.flush()

    options = probe.ProbeOptions(exhaustive=args.exhaustive, max_tds=args.max_tds,
                                 jobs=args.jobs, progress=progress if tty else None)
    try:
        result = probe.probe(backend.seam, options, label=backend.label, given=known)
    except ProbeError as e:
        sys.stderr.write(("\n" if tty else "") + f"kvmtdx: error: {e}\n")
        return ExitCode.FAIL
    if tty:
        sys.stderr.write("\n")
    if args.emit_allowlist:
        emit(render.allowlist_text(result, datetime.date.today().isoformat()),
             args.emit_allowlist)
    emit(render.render_json(result) if args.format == "json" else render.render_text(result),
         args.output)
    return ExitCode.FAIL if result.failures else ExitCode.PASS


def cmd_diff(args: argparse.Namespace) -> int:
    from kvmtdx import diff
    from kvmtdx.model.policy import get_policy, load_allowlist
    from kvmtdx.model.profiles import load_profile
    from kvmtdx.native import host_by_name
    from kvmtdx.report import diff as render
    from kvmtdx.report import emit

    result: diff.FileDiff | diff.PolicyDiff
    if args.policy or args.module:
        if args.files:
            raise DataError("diff takes either two JSON files or --module M --policy A --policy B")
        if not args.module or not args.policy or len(args.policy) != 2:
            raise DataError("a policy diff needs --module M and --policy given twice "
                            "(e.g. --policy upstream --policy rfc-v2)")
        allowlist = load_allowlist(args.allowlist) if args.allowlist else None
        result = diff.diff_policies(load_profile(args.module), host_by_name(args.host),
                                    get_policy(args.policy[0], allowlist),
                                    get_policy(args.policy[1], allowlist))
        differs = result.differs
    else:
        if len(args.files) != 2:
            raise DataError("diff needs two JSON files (probe, verify or caps reports), "
                            "or --module M --policy A --policy B")
        result = diff.diff_files(diff.load_snapshot(args.files[0]),
                                 diff.load_snapshot(args.files[1]))
        differs = bool(result.changes or result.only_a or result.only_b)
    emit(render.render(result, args.format), args.output)
    return ExitCode.FAIL if differs else ExitCode.PASS


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "info": cmd_info,
    "caps": cmd_caps,
    "predict": cmd_predict,
    "init-vm": cmd_init_vm,
    "verify": cmd_verify,
    "probe": cmd_probe,
    "diff": cmd_diff,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "simulate", None) == "list":
            return _simulate_list(args)
        return COMMANDS[args.command](args)
    except DataError as e:
        sys.stderr.write(f"kvmtdx: error: {e}\n")
        return ExitCode.USAGE
    except KvmError as e:
        sys.stderr.write(f"kvmtdx: {'skip' if e.skip else 'error'}: {e.reason}"
                         + (f"; {SIM_HINT}" if e.skip else "") + "\n")
        return ExitCode.SKIP if e.skip else ExitCode.FAIL
    except OSError as e:
        sys.stderr.write(f"kvmtdx: error: {e}\n")
        return ExitCode.FAIL
    except KeyboardInterrupt:
        sys.stderr.write("kvmtdx: interrupted\n")
        return 130

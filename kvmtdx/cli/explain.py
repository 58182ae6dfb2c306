"""`kvmtdx explain`: a status, a log or a refused request, explained down to the bit.

Exit codes: 0 something was explained (or the host check ran), 1 nothing in
the inputs was recognised, 2 bad input, 4 no TDX here (--host-check on a real
device).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from kvmtdx.cli.common import (
    Command,
    backend_options,
    open_session,
    output_options,
    write,
)
from kvmtdx.errors import DataError, ExitCode
from kvmtdx.explain import explain, host_check, read_input, render
from kvmtdx.model.policy import POLICY_NAMES, Policy, get_policy, load_allowlist
from kvmtdx.model.profiles import Host, ModuleProfile, load_profile
from kvmtdx.model.requests import load_request
from kvmtdx.report import to_json
from kvmtdx.session import Backend

DESCRIPTION = (
    "Explain a failing TD launch: decode TDX module statuses and KVM errnos given as "
    "values or found in pasted logs (QEMU, libvirt, the kernel log, cloud-hypervisor, "
    "any hex), replay an INIT_VM request through the model to name every bit at fault "
    "with QEMU's -cpu name and a fix, or list what a -cpu host TD cannot get on a host."
)
EPILOG = ("exit codes: 0 explained (or the host check ran), 1 nothing recognised, "
          "2 usage or input error, 4 no TDX here (--host-check on a real device)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="STATUS|LOGFILE|-",
                   help="a TDX status (0xc000010000000045, hex with or without 0x, or its "
                        "name), an errno (EINVAL, -22, 'Invalid argument'), a log file, or - "
                        "for standard input")
    p.add_argument("--request", metavar="FILE",
                   help="the KVM_TDX_INIT_VM request (JSON, as init-vm takes it): replay it "
                        "and name every bit at fault")
    p.add_argument("--host-check", action="store_true",
                   help="what a -cpu host TD cannot get here, and why (reads the backend)")
    backend_options(p)
    g = p.add_argument_group("the model")
    g.add_argument("--module", metavar="NAME|FILE", help="TDX module profile (1.5.01, 1.5-late, "
                   "2.0, or a JSON file)")
    g.add_argument("--policy", choices=[*POLICY_NAMES, "auto"],
                   help="kernel policy (default: the simulated host's; upstream with --module; "
                        "auto: chosen from the device's capabilities, the default of "
                        "--host-check)")
    g.add_argument("--allowlist", metavar="FILE", help="the kernel's allowlist (rfc-v2)")
    output_options(p, ("text", "json"))


def _backend(args: argparse.Namespace, *, real: bool) -> Backend | None:
    if not (args.simulate or args.backend or args.kernel_source or real):
        return None
    return open_session(args)


def _model(args: argparse.Namespace) -> tuple[ModuleProfile | None, Host | None, Policy | None]:
    from kvmtdx.native import host_by_name  # reads this machine only for --host native

    module = load_profile(args.module) if args.module else None
    host = host_by_name(args.host) if args.host else None
    allowlist = load_allowlist(args.allowlist) if args.allowlist else None
    name = args.policy if args.policy not in (None, "auto") else None
    if name is None and module is not None and not args.simulate and args.policy != "auto":
        name = "upstream"  # Linux 6.19 to 7.3
    return module, host, get_policy(name, allowlist) if name else None


def _host_check(args: argparse.Namespace) -> int:
    module, host, policy = _model(args)
    backend = _backend(args, real=True)
    assert backend is not None
    allowlist = load_allowlist(args.allowlist) if args.allowlist else None
    result = host_check.run(backend, module=module, policy=policy.name if policy else "auto",
                            host=host, allowlist=allowlist)
    write(args, to_json(render.host_check_json(result)) if args.format == "json"
          else render.host_check_text(result),
          f"{len(result.missing)} features a -cpu host TD cannot get here")
    return ExitCode.PASS


def run(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    if args.host_check:
        if args.inputs or args.request:
            raise DataError("--host-check takes no STATUS, LOGFILE or --request")
        return _host_check(args)
    if not args.inputs and not args.request:
        raise DataError("explain needs a STATUS, a LOGFILE, - (standard input) or --request")
    if args.inputs.count("-") > 1:
        raise DataError("- (standard input) can be given once")
    inputs = [read_input(a, stdin if stdin is not None else sys.stdin) for a in args.inputs]
    request = load_request(args.request) if args.request else None
    if request is not None and request.before:
        raise DataError(f"--request {args.request}: explain diagnoses one request on a fresh "
                        "TD, not a TD's history ('before'); kvmtdx init-vm --request replays it")
    module, host, policy = _model(args)
    auto = args.policy == "auto" and request is not None
    backend = _backend(args, real=auto)
    if auto and backend is not None and not backend.simulated:
        allowlist = load_allowlist(args.allowlist) if args.allowlist else None
        policy = host_check.auto_policy(backend, module=module, host=host, allowlist=allowlist)
    result = explain(inputs, request=request, module=module, host=host, policy=policy,
                     backend=backend)
    said = (f"{len(result.items)} statuses or errors explained"
            + (", the request replayed" if result.diagnosis is not None else "")
            if result.found else "nothing recognised")
    write(args, to_json(render.explanation_json(result)) if args.format == "json"
          else render.explanation_text(result), said)
    return ExitCode.PASS if result.found else ExitCode.FAIL


def _run(args: argparse.Namespace) -> int:
    return run(args)


COMMAND = Command("explain", "explain a failing TD launch: a status, a log line, a request",
                  add_arguments, _run, description=DESCRIPTION, epilog=EPILOG)

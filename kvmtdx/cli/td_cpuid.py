"""`kvmtdx td-cpuid`: what a TD really gets for a request, in one step, on any backend."""

from __future__ import annotations

import argparse

from kvmtdx.cli.common import (
    Command,
    backend_options,
    given_from,
    identity_of,
    model_options,
    open_session,
    output_options,
    write,
)
from kvmtdx.errors import ExitCode


def arguments(p: argparse.ArgumentParser) -> None:
    backend_options(p, judges_host=True)
    model_options(p, "auto", auto=True,
                  module="says why each bit differs (with --simulate, the simulated host's "
                         "module is known; without one, differences are listed unexplained)",
                  policy="the kernel the request is predicted for; auto picks the policy "
                         "whose predicted capabilities match the kernel's")
    p.add_argument("--request", metavar="FILE",
                   help="the KVM_TDX_INIT_VM request (JSON, as init-vm takes it; '-' reads "
                        "standard input); default: every feature bit KVM reports")
    output_options(p, ("text", "json"))


def run(args: argparse.Namespace) -> int:
    from kvmtdx.model.requests import load_request
    from kvmtdx.report import td_cpuid as render
    from kvmtdx.td_cpuid import td_cpuid_once

    request = load_request(args.request) if args.request else None
    backend = open_session(args)
    t = td_cpuid_once(backend, request, given_from(args, backend))  # KvmError(skip): exit 4
    verdict = f"KVM_TDX_INIT_VM {t.run.outcome.describe()}" + (
        f", {len(t.read.entries)} CPUID entries read back" if t.read and t.read.entries
        else "")
    identity = identity_of(backend, t.knowledge)
    write(args, render.td_cpuid_json(t, identity) if args.format == "json"
          else render.render_text(t), verdict)
    return ExitCode.PASS


COMMAND = Command("td-cpuid", "INIT_VM on a fresh TD, then the TD's CPUID (KVM_TDX_GET_CPUID) "
                  "beside the request: every bit that differs, and why", arguments, run)

"""`kvmtdx init-vm`: one KVM_TDX_INIT_VM on a fresh TD, its outcome as JSON (or text)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from kvmtdx.cli.common import (
    Command,
    backend_options,
    identity_of,
    open_session,
    output_options,
    write,
)
from kvmtdx.errors import DataError, ExitCode

if TYPE_CHECKING:
    from kvmtdx.model.requests import Request
    from kvmtdx.session import Backend


def arguments(p: argparse.ArgumentParser) -> None:
    backend_options(p)
    p.add_argument("--allowlist", metavar="FILE",
                   help="the allowlist of the simulated rfc-v2 kernel (JSON), replacing the "
                        "bundled table (needs --simulate MODULE:rfc-v2)")
    # Required, but checked in run() so that --simulate list works here too.
    p.add_argument("--request", metavar="FILE",
                   help="the KVM_TDX_INIT_VM request to send (JSON, see README; '-' reads "
                        "standard input); required")
    p.add_argument("--effective", action="store_true",
                   help="after an ACCEPTED INIT_VM, read the TD's CPUID back (split irqchip, "
                        "one vCPU, KVM_TDX_GET_CPUID) and set it beside the request: every bit "
                        "that differs, and why")
    output_options(p, ("json", "text"))


def run(args: argparse.Namespace) -> int:
    from kvmtdx.model.requests import load_request
    from kvmtdx.report import sim as render
    from kvmtdx.session import init_vm_once

    if not args.request:
        raise DataError("init-vm needs --request FILE (a KVM_TDX_INIT_VM request as JSON)")
    request = load_request(args.request)
    backend = open_session(args)
    if args.effective:
        return _effective(args, backend, request)
    outcome = init_vm_once(backend, request)  # KvmError(skip) without TDX: exit 4
    write(args, render.init_vm_json(outcome, identity_of(backend)) if args.format == "json"
          else render.init_vm_text(outcome), f"KVM_TDX_INIT_VM {outcome.outcome.describe()}")
    return ExitCode.PASS


def _effective(args: argparse.Namespace, backend: Backend, request: Request) -> int:
    from kvmtdx.knowledge import given
    from kvmtdx.report import td_cpuid as render
    from kvmtdx.td_cpuid import td_cpuid_once

    t = td_cpuid_once(backend, request, given(backend.simulation))
    write(args, render.init_vm_json(t, identity_of(backend, t.knowledge))
          if args.format == "json" else render.render_text(t),
          f"KVM_TDX_INIT_VM {t.run.outcome.describe()}")
    return ExitCode.PASS


COMMAND = Command("init-vm", "one KVM_TDX_INIT_VM on a fresh TD; outcome as JSON "
                  "(--effective: and the TD's CPUID)",
                  arguments, run)

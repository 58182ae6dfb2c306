"""`kvmtdx predict`: the mirror's capabilities, and with --request its INIT_VM answer."""

from __future__ import annotations

import argparse

from kvmtdx.cli.common import (
    HOST_FORMS,
    HOST_METAVAR,
    Command,
    check_host,
    model_options,
    note_module,
    output_options,
    policy_from,
    write,
)
from kvmtdx.errors import DataError, ExitCode


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", metavar=HOST_METAVAR, default="max",
                   help=f"the host CPU's native CPUID: {HOST_FORMS} (default: max)")
    model_options(p, "upstream", module="required", policy="the kernel to predict")
    p.add_argument("--request", metavar="FILE",
                   help="a KVM_TDX_INIT_VM request (JSON, see README; '-' reads standard input) "
                        "whose outcome to predict")
    output_options(p, ("text", "json"))


def run(args: argparse.Namespace) -> int:
    from kvmtdx.model import lifecycle, mirror
    from kvmtdx.model.profiles import MODULE_CHOICES, load_profile
    from kvmtdx.model.requests import load_request
    from kvmtdx.native import host_by_name
    from kvmtdx.report import predict as render

    if not args.module:
        raise DataError(f"predict needs --module: {MODULE_CHOICES} or a module JSON file")
    module = load_profile(args.module)
    host = host_by_name(args.host)
    check_host(module, host, args.host)
    note_module(module)
    policy = policy_from(args, args.policy)
    request = load_request(args.request) if args.request else None
    caps = mirror.predict_capabilities(module, host, policy, len(module.rows))
    pred = (lifecycle.replay_prediction(module, host, policy, request)
            if request is not None else None)
    fmt = render.render_json if args.format == "json" else render.render_text
    said = (f"{caps.caps.nent} CPUID entries predicted" if caps.caps is not None
            else "KVM_TDX_CAPABILITIES predicted to fail")
    if pred is not None:
        said += f"; KVM_TDX_INIT_VM {pred.outcome.describe()}"
    write(args, fmt(module, host, policy, caps, pred), said)
    return ExitCode.PASS


COMMAND = Command("predict", "the mirror's prediction of capabilities (and of INIT_VM)",
                  arguments, run)

"""`kvmtdx caps`: KVM_TDX_CAPABILITIES decoded bit by bit, optionally saved as a module profile."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from kvmtdx.cli.common import (
    Command,
    backend_options,
    identity_of,
    model_options,
    open_session,
    output_file,
    output_options,
    policy_from,
    save,
    write,
)
from kvmtdx.errors import DataError, ExitCode

if TYPE_CHECKING:
    from kvmtdx.model.profiles import ModuleProfile
    from kvmtdx.structs import Capabilities


def arguments(p: argparse.ArgumentParser) -> None:
    backend_options(p)
    model_options(p, None, module="for --save-module: fill the bits the policy hides from "
                                   "this module's table",
                  policy="for --save-module: the running kernel's, which says the bits it hides")
    p.add_argument("--save-module", metavar="FILE", type=output_file("--save-module"),
                   help="write the module profile these capabilities imply, loadable with "
                        "--module (needs --policy: the running kernel's)")
    output_options(p, ("text", "json"))


def run(args: argparse.Namespace) -> int:
    from kvmtdx.hostinfo import read_capabilities
    from kvmtdx.report import caps as render

    if args.save_module and not args.policy:
        raise DataError("--save-module needs --policy: the policy of the running kernel "
                        "(upstream-6.16, upstream or rfc-v2) says which bits it hides")
    backend = open_session(args)
    reading = read_capabilities(backend)  # KvmError(skip) without TDX: main() exits 4
    said = f"KVM_TDX_CAPABILITIES, {reading.caps.nent} CPUID entries"
    if args.format == "json":
        write(args, render.render_json(reading.caps, backend.label, reading.counters,
                                       identity_of(backend)), said)
    else:
        write(args, render.render_text(reading.caps, backend.label, reading.counters), said)
    if args.save_module:
        save(render.module_profile_json(_saved_module(args, reading.caps, backend.label)),
             args.save_module, "--save-module")
    return ExitCode.PASS


def _saved_module(args: argparse.Namespace, caps: Capabilities, label: str) -> ModuleProfile:
    from kvmtdx.model.infer import module_from_capabilities
    from kvmtdx.model.profiles import load_profile

    policy = policy_from(args, args.policy)
    base = load_profile(args.module) if args.module else None
    return module_from_capabilities(
        caps, policy, base=base, name=f"saved-{policy.name}",
        source=f"kvmtdx caps --save-module on {label}, policy {policy.name}"
        + (f", hidden bits filled from module {base.name}" if base else
           ", bits the policy hides marked unknown"))


COMMAND = Command("caps", "KVM_TDX_CAPABILITIES, decoded bit by bit", arguments, run)

"""`kvmtdx info`: the KVM/TDX environment, and whether TDX is usable (exit 0, else 4 or 1)."""

from __future__ import annotations

import argparse

from kvmtdx.cli.common import (
    Command,
    backend_options,
    identity_of,
    open_session,
    output_options,
    write,
)
from kvmtdx.errors import ExitCode, KvmError


def arguments(p: argparse.ArgumentParser) -> None:
    backend_options(p)
    output_options(p, ("text", "json"))


def run(args: argparse.Namespace) -> int:
    from kvmtdx.hostinfo import gather_info
    from kvmtdx.report import info as render

    backend = open_session(args)
    info = gather_info(backend)
    write(args, render.render_json(info, identity_of(backend)) if args.format == "json"
          else render.render_text(info), "TDX usable" if info.tdx_available else "TDX not usable")
    if not info.tdx_available:
        # The report is out; the reason goes to stderr as every other command's does.
        raise KvmError(info.reason, skip=info.skip)
    return ExitCode.PASS


COMMAND = Command("info", "the environment: /dev/kvm, VM types, whether TDX is usable",
                  arguments, run)

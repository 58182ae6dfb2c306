"""What every command shares: the parser, option groups, the backend, what a run knows, output.

A command is a `Command`: its name and help, a function that adds its
arguments, and a function that runs it (parse, call, render; errors go up to
`main`, which maps them to exit codes through kvmtdx.errors alone).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmtdx.errors import ExitCode, KvmtdxError

if TYPE_CHECKING:
    from kvmtdx.knowledge import Given
    from kvmtdx.model.policy import Policy
    from kvmtdx.model.profiles import Host, ModuleProfile
    from kvmtdx.session import Backend

SIM_HINT = (
    "run the same against the simulated host with --simulate MODULE[:POLICY] "
    "(see --simulate list)"
)
POLICY_CHOICES = ("upstream-6.16", "upstream", "rfc-v2")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"kvmtdx: error: {message} (see kvmtdx --help)\n")
        raise SystemExit(ExitCode.USAGE)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    epilog: str | None = None


# ---------------------------------------------------------------------------
# Option groups.


def backend_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to talk to")
    g.add_argument("--simulate", metavar="MODULE[:POLICY[:MUTANT]]",
                   help="use the simulated TDX host instead of /dev/kvm "
                        "(default policy 'upstream'; 'list' prints the choices)")
    g.add_argument("--backend", metavar="package.module:factory",
                   help="use a syscall seam of your own (open/ioctl/close)")
    g.add_argument("--kernel-source", metavar="DIR",
                   help="use a kernel tree's own KVM TDX code, compiled for userspace, with the "
                        "TDX module answered by kvmtdx's model (needs a C compiler)")
    g.add_argument("--patch", action="append", default=[], metavar="FILE|NAME",
                   help="apply this patch to a private copy of --kernel-source first "
                        "(repeatable; 'rfc-v2' is the bundled reconstruction of the series)")
    g.add_argument("--host", metavar="FILE|max",
                   help="native CPUID of the simulated or kernel-source host "
                        "(default: max, every feature)")


def model_options(p: argparse.ArgumentParser, policy_default: str | None,
                  auto: bool = False) -> None:
    g = p.add_argument_group("what the kernel should do")
    g.add_argument("--module", metavar="NAME|FILE",
                   help="TDX module profile: 1.5.01, 1.5-late, 2.0, or a JSON file")
    choices = [*POLICY_CHOICES, *(["auto"] if auto else [])]
    g.add_argument("--policy", choices=choices, default=policy_default,
                   help=f"kernel policy (default: {policy_default})")
    g.add_argument("--allowlist", metavar="FILE",
                   help="the tested kernel's allowlist as JSON (replaces the bundled rfc-v2 table)")


def output_options(p: argparse.ArgumentParser, formats: Sequence[str]) -> None:
    """--format (the first of `formats` is the default) and --output."""
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=list(formats), default=formats[0])
    g.add_argument("--output", metavar="FILE", help="write the report here (atomically)")


# ---------------------------------------------------------------------------
# What the options mean.


def open_session(args: argparse.Namespace) -> Backend:
    """The seam a command talks to, from --simulate / --backend / --host / --allowlist."""
    from kvmtdx.model.policy import load_allowlist
    from kvmtdx.native import host_by_name
    from kvmtdx.session import open_backend

    host_arg = getattr(args, "host", None)
    allow_arg = getattr(args, "allowlist", None)
    backend = open_backend(
        simulate=args.simulate,
        backend=args.backend,
        host=host_by_name(host_arg) if host_arg else None,
        allowlist=load_allowlist(allow_arg) if allow_arg else None,
        kernel_source=getattr(args, "kernel_source", None),
        patches=tuple(getattr(args, "patch", ())),
        module=getattr(args, "module", None),
    )
    sim = backend.simulation
    if sim is not None:
        check_host(sim.module, sim.host, host_arg)
        note_module(sim.module)
    return backend


def check_host(module: ModuleProfile, host: Host, host_arg: str | None) -> None:
    """The one clear error for a --host the module would not initialise on."""
    from kvmtdx.model.profiles import host_refusal

    refusal = host_refusal(module, host, f"--host {host_arg}" if host_arg else "host")
    if refusal is not None:
        raise refusal


def given_from(args: argparse.Namespace, backend: Backend) -> Given:
    """What --module, --host, --policy and --allowlist tell verify and probe."""
    from kvmtdx.knowledge import given

    known = given(backend.simulation, module=args.module, host=args.host, policy=args.policy,
                  allowlist=args.allowlist)
    if known.module is not None and known.host is not None:
        check_host(known.module, known.host, args.host)
    if args.module:
        note_module(known.module)
    return known


def policy_from(args: argparse.Namespace, name: str) -> Policy:
    """The kernel policy `name`, with --allowlist's table when one is given."""
    from kvmtdx.model.policy import get_policy, load_allowlist

    return get_policy(name, load_allowlist(args.allowlist) if args.allowlist else None)


# ---------------------------------------------------------------------------
# Output.


def write(args: argparse.Namespace, text: str) -> None:
    """The report to stdout, or atomically to --output."""
    from kvmtdx.report import emit

    emit(text, getattr(args, "output", None))


def say(label: str, message: str) -> None:
    """One line on stderr: `kvmtdx: LABEL: MESSAGE`."""
    sys.stderr.write(f"kvmtdx: {label}: {message}\n")


def note_module(module: ModuleProfile | None) -> None:
    """Say on stderr what a user choosing this module must know (a module Linux 6.16 and
    later will not enable TDX on)."""
    from kvmtdx.model.profiles import kernel_note

    note = kernel_note(module) if module is not None else None
    if note:
        say("note", note)


def error_line(error: BaseException) -> str:
    """The one line an error that reached `main` prints (its exit code: errors.exit_code_of)."""
    if isinstance(error, KeyboardInterrupt):
        return "kvmtdx: interrupted\n"
    if isinstance(error, KvmtdxError):
        hint = f"; {SIM_HINT}" if error.code == ExitCode.SKIP else ""
        return f"kvmtdx: {error.label}: {error}{hint}\n"
    return f"kvmtdx: error: {error}\n"


def simulate_list(args: argparse.Namespace) -> int:
    """`--simulate list`, from any command that takes --simulate."""
    from kvmtdx import sim
    from kvmtdx.report import sim as render

    fmt = render.choices_json if getattr(args, "format", "text") == "json" else render.choices_text
    write(args, fmt(sim.choices()))
    return ExitCode.PASS

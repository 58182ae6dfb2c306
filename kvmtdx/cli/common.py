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

from kvmtdx import outfile
from kvmtdx.errors import DataError, ExitCode, KvmtdxError, Terminated

if TYPE_CHECKING:
    from kvmtdx.identity import HostIdentity
    from kvmtdx.knowledge import Given, Knowledge
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


HOST_FORMS = ("FILE (a host JSON file: name, xfam_supported, ept_5level, tsx_ctrl, cpuid "
              "rows), native (this machine's, read from /dev/cpu/0/cpuid; modprobe cpuid) or "
              "max (every feature any module allows)")
HOST_METAVAR = "FILE|native|max"


def backend_options(p: argparse.ArgumentParser, *, judges_host: bool = False) -> None:
    """--simulate, --backend and --host.  `judges_host`: the command also judges a real
    device by --host (verify, probe); elsewhere it only shapes the simulated host."""
    g = p.add_argument_group("what to talk to (default: the real /dev/kvm)")
    g.add_argument("--simulate", metavar="MODULE[:POLICY[:MUTANT]]",
                   help="use the simulated TDX host instead of /dev/kvm: MODULE 1.5.01, "
                        "1.5-late, 2.0 or a module profile JSON file; POLICY upstream-6.16, "
                        "upstream (the default) or rfc-v2; MUTANT one of its seeded kernel bugs; "
                        "'list' prints the choices")
    g.add_argument("--backend", metavar="package.module:factory",
                   help="use a syscall seam of your own: the factory returns an object with "
                        "open(path, flags), ioctl(fd, request, arg) and close(fd)")
    g.add_argument("--kernel-source", metavar="DIR",
                   help="use a kernel tree's own KVM TDX code, compiled for userspace, with the "
                        "TDX module answered by kvmtdx's model (needs a C compiler; --module "
                        "picks the module, default 2.0)")
    g.add_argument("--patch", action="append", default=[], metavar="FILE|NAME",
                   help="apply this patch to a private copy of --kernel-source first "
                        "(repeatable; 'rfc-v2' is the bundled reconstruction of the series)")
    real = ("; on a real device or --backend, the host the run is judged by (default: "
            "inferred from the capabilities)") if judges_host else \
        " (needs --simulate or --kernel-source; a real device has its own)"
    g.add_argument("--host", metavar=HOST_METAVAR,
                   help=f"the host CPU's native CPUID: {HOST_FORMS}; with --simulate or "
                        f"--kernel-source, the CPU that host runs on (default max){real}")


def model_options(p: argparse.ArgumentParser, policy_default: str | None, *, module: str,
                  policy: str, auto: bool = False) -> None:
    """--module, --policy and --allowlist; `module` and `policy` say what the command does
    with them (the policy's default is added here)."""
    g = p.add_argument_group("what the kernel should do")
    g.add_argument("--module", metavar="NAME|FILE",
                   help=f"TDX module profile: 1.5.01, 1.5-late, 2.0, or a JSON file; {module}")
    choices = [*POLICY_CHOICES, *(["auto"] if auto else [])]
    default = f" (default: {policy_default})" if policy_default is not None else ""
    g.add_argument("--policy", choices=choices, default=policy_default,
                   help=f"the kernel policy: {policy}{default}")
    g.add_argument("--allowlist", metavar="FILE",
                   help="the tested kernel's allowlist as JSON, replacing the bundled rfc-v2 "
                        "table (only for a policy with an allowlist: rfc-v2)")


# What verify and probe do with --module and --policy.
JUDGED_BY = {
    "module": "gives exact predictions (with --simulate, the simulated host's module is "
              "known; on a real device without it, the checks that need one skip)",
    "policy": "the kernel the run is judged by; auto picks the policy whose predicted "
              "capabilities match the kernel's",
}


FORMATS = {"text": "text (for people)", "json": "json (schema 1, see README)",
           "ktap": "ktap (KTAP v1, for kselftest runners)", "junit": "junit (JUnit XML)",
           "html": "html (one self-contained page)", "markdown": "markdown (a table)"}


def output_options(p: argparse.ArgumentParser, formats: Sequence[str],
                   also: bool = False) -> None:
    """--format (the first of `formats` is the default) and --output; with `also`, --also
    FORMAT:FILE, the same run's report in more formats (one run's KTAP, JUnit and JSON
    for a test harness that keeps them all)."""
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=list(formats), default=formats[0],
                   help="the report's format: " + ", ".join(FORMATS[f] for f in formats)
                        + f" (default: {formats[0]})")
    g.add_argument("--output", metavar="FILE", type=output_file("--output"),
                   help="write the report to FILE instead of standard output: a regular file "
                        "is replaced atomically, anything else (a symlink's target, a device, "
                        "a FIFO) written through as sh's > does; the verdict goes to stderr")
    if also:
        g.add_argument("--also", action="append", default=[], metavar="FORMAT:FILE",
                       type=_also_type(formats),
                       help=f"also write the report as FORMAT ({', '.join(formats)}) to FILE, "
                            "as --output writes it; repeatable")


def _also_type(formats: Sequence[str]) -> Callable[[str], tuple[str, str]]:
    def parse(text: str) -> tuple[str, str]:
        fmt, sep, path = text.partition(":")
        if not sep or not path or fmt not in formats:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected FORMAT:FILE with FORMAT one of {', '.join(formats)}")
        return fmt, output_file("--also")(path)
    return parse


def output_file(option: str) -> Callable[[str], str]:
    """The argparse `type=` of an option naming a file to write: checked before the run."""
    return outfile.argument(outfile.check_file, option)


def output_directory(option: str) -> Callable[[str], str]:
    """The argparse `type=` of an option naming a directory to write files into."""
    return outfile.argument(outfile.check_directory, option)


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


def write(args: argparse.Namespace, text: str, verdict: str) -> None:
    """The report to stdout, or to --output with `verdict` (one line: the outcome in
    brief) on stderr, so a console still hears how the run went.

    A report that cannot be written after the run goes to stdout all the same (a long
    run is not lost), and the error (exit 2) names the user's path.
    """
    output = getattr(args, "output", None)
    if output is None or output == outfile.STDOUT:
        _stdout(text)
        return
    try:
        outfile.write(text, output, "--output")
    except outfile.OutputError as e:
        _stdout(text)
        raise DataError(f"{e} (the report went to standard output)") from None
    sys.stderr.write(f"kvmtdx {args.command}: {verdict} -> {output}\n")


def save(text: str, path: str, option: str) -> None:
    """A file beside the report (--emit-allowlist, --save-module ...), written as --output."""
    outfile.write(text, path, option)


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def write_also(args: argparse.Namespace, render: Callable[[str], str]) -> None:
    """Each --also FORMAT:FILE: the report rendered in FORMAT, written as --output writes."""
    for fmt, path in getattr(args, "also", []):
        save(render(fmt), path, "--also")


def identity_of(backend: Backend, knowledge: Knowledge | None = None) -> HostIdentity:
    """The host identity a run's JSON report carries (kvmtdx.identity)."""
    from kvmtdx.identity import identify

    return identify(backend, knowledge)


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
        return f"kvmtdx: {interruption(error)}\n"
    if isinstance(error, KvmtdxError):
        hint = f"; {SIM_HINT}" if error.code == ExitCode.SKIP else ""
        return f"kvmtdx: {error.label}: {error}{hint}\n"
    return f"kvmtdx: error: {error}\n"


def interruption(error: KeyboardInterrupt) -> str:
    """What stopped the run, in a word: "terminated" (SIGTERM) or "interrupted" (SIGINT)."""
    return "terminated" if isinstance(error, Terminated) else "interrupted"


def simulate_list(args: argparse.Namespace) -> int:
    """`--simulate list`, from any command that takes --simulate."""
    from kvmtdx import sim
    from kvmtdx.report import sim as render

    fmt = render.choices_json if getattr(args, "format", "text") == "json" else render.choices_text
    write(args, fmt(sim.choices()), "the simulated host's modules, policies and mutants")
    return ExitCode.PASS

"""What the tests share: the CLI run in-process, fake seams, the lookup-trap requests, a strict
KTAP reader and golden files.

pytest puts tests/ on sys.path, so `from helpers import ...` works in every test module, and
the seam factories below load the way a user's do: `--backend helpers:no_tdx`.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import re
import signal
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from kvmtdx import cli, uapi
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, Host, load_profile
from kvmtdx.model.requests import Request, request_to_json
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, CpuidEntry, InitVm

# ---------------------------------------------------------------------------
# The command line, in-process.


class CliRun(NamedTuple):
    rc: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.out)
        return doc


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> CliRun:
    """`kvmtdx ARGV` through cli.main: exit code, stdout and stderr (a usage error, which
    argparse raises as SystemExit, gives its code)."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return CliRun(rc, out, err)


# ---------------------------------------------------------------------------
# Fake seams: what a host without KVM, without permission or without TDX answers.


class AbsentKvm:
    """No /dev/kvm at all: open fails with ENOENT, and no fd ever exists to use."""

    def open(self, path: str, flags: int) -> int:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def close(self, fd: int) -> None:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))


class DeniedKvm(AbsentKvm):
    """/dev/kvm is there, but root-only."""

    def open(self, path: str, flags: int) -> int:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)


class NoTdxKvm(AbsentKvm):
    """A KVM with only the default VM type, like most machines'."""

    def open(self, path: str, flags: int) -> int:
        return 3

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        if request == uapi.Ioctl.KVM_GET_API_VERSION:
            return uapi.KVM_API_VERSION
        if request == uapi.Ioctl.KVM_CHECK_EXTENSION and arg == uapi.KVM_CAP_VM_TYPES:
            return 1 << uapi.VmType.KVM_X86_DEFAULT_VM
        if request == uapi.Ioctl.KVM_CREATE_VM and arg == uapi.VmType.KVM_X86_TDX_VM:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    def close(self, fd: int) -> None:
        pass


class OldApiKvm(NoTdxKvm):
    """A KVM whose KVM_GET_API_VERSION is not 12: a broken kernel, not a missing feature."""

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        if request == uapi.Ioctl.KVM_GET_API_VERSION:
            return uapi.KVM_API_VERSION - 1
        return super().ioctl(fd, request, arg)


def no_kvm() -> AbsentKvm:
    return AbsentKvm()


def denied() -> DeniedKvm:
    return DeniedKvm()


def no_tdx() -> NoTdxKvm:
    return NoTdxKvm()


def old_api() -> OldApiKvm:
    return OldApiKvm()


def simulated(module: str = "2.0", policy: str = "upstream", **kwargs: Any) -> SimulatedHost:
    """The simulated host of `module` and `policy` on the max host."""
    return SimulatedHost(load_profile(module), MAX_HOST, get_policy(policy), **kwargs)


class PassThrough:
    """A seam in front of a simulated host: every call goes through to `inner`; a test's
    seam overrides `ioctl` to count, answer otherwise or watch, and calls this one."""

    def __init__(self, inner: SimulatedHost) -> None:
        self.inner = inner

    def open(self, path: str, flags: int) -> int:
        return self.inner.open(path, flags)

    def close(self, fd: int) -> None:
        self.inner.close(fd)

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        return self.inner.ioctl(fd, request, arg)


class SignalMidway(PassThrough):
    """The simulated host (module 2.0, upstream) that sends this process `signum` at its
    `at`-th ioctl, as a user's Ctrl-C or a runner's timeout would.  At exit it says on
    stderr how many of its fds are still open (the handles must have closed them)."""

    def __init__(self, signum: int, at: int = 300) -> None:
        super().__init__(simulated())
        self.signum, self.at, self.calls = signum, at, 0
        atexit.register(self.report)

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return super().ioctl(fd, request, arg)

    def report(self) -> None:
        sys.stderr.write(f"simulated fds open at exit: {len(self.inner.open_fds)}\n")


def sigint_midway() -> SignalMidway:
    return SignalMidway(signal.SIGINT)


def sigterm_midway() -> SignalMidway:
    return SignalMidway(signal.SIGTERM)


def must_not_run() -> AbsentKvm:
    """For runs that must stop before they open a backend (a bad option, a bad path)."""
    raise AssertionError("the backend was opened: the run went ahead")


# ---------------------------------------------------------------------------
# The lookup trap of spec section 4: the denylist bypass of Linux 6.16 to 7.3.

WAITPKG = 1 << 5  # CPUID.7.0:ECX[5]
GPAW48 = CpuidEntry(function=0x80000008, eax=48 << 16)
MINIMAL = InitVm(xfam=0x3, entries=(GPAW48,))


def with_bypass(entries: Iterable[CpuidEntry], *, ebx: int = 0, ecx: int = WAITPKG,
                flagged: bool = True) -> tuple[CpuidEntry, ...]:
    """`entries` with their leaf 7 replaced by the trap: flagged 7.1 and 7.2 take those rows,
    so an unflagged index-5 entry carrying `ebx`/`ecx` is what KVM finds for row 7.0, and the
    count still balances.  Without `flagged`, the index-5 entry alone (the count breaks)."""
    trap = (CpuidEntry(7, 1, FLAG_SIGNIFICANT_INDEX), CpuidEntry(7, 2, FLAG_SIGNIFICANT_INDEX))
    return (*(trap if flagged else ()), CpuidEntry(7, 5, 0, ebx=ebx, ecx=ecx),
            *(e for e in entries if e.function != 7))


def bypass(base: InitVm = MINIMAL, *, ebx: int = 0, ecx: int = WAITPKG,
           flagged: bool = True) -> InitVm:
    """`base` (default: leaf 0x80000008 alone, GPAW 48) smuggling WAITPKG onto row 7.0."""
    return replace(base, entries=with_bypass(base.entries, ebx=ebx, ecx=ecx, flagged=flagged))


def bypass_request() -> dict[str, Any]:
    """The minimal bypass as an init-vm / predict --request file."""
    return request_to_json(Request(init_vm=bypass()))


def write_request(folder: Path, request: Request | dict[str, Any], name: str = "req.json"
                  ) -> str:
    """`request` as a request file in `folder`; its path, for --request."""
    doc = request if isinstance(request, dict) else request_to_json(request)
    path = folder / name
    path.write_text(json.dumps(doc))
    return str(path)


# ---------------------------------------------------------------------------
# A strict KTAP v1 reader (Documentation/dev-tools/ktap.rst).

_RESULT = re.compile(
    r"(?P<ok>ok|not ok) (?P<num>[1-9][0-9]*)(?: (?P<desc>[^#]*[^#\s]))?"
    r"(?: # (?P<directive>SKIP|TODO|XFAIL|TIMEOUT|ERROR)(?: (?P<reason>[^\n]*))?)?"
)
_PLAN = re.compile(r"1\.\.(?P<n>0|[1-9][0-9]*)(?: # SKIP(?: (?P<reason>.+))?)?")


class KtapError(AssertionError):
    pass


def _ktap_result(line: str, i: int, expected_num: int) -> dict[str, Any]:
    r = _RESULT.fullmatch(line)
    if r is None:
        raise KtapError(f"line {i}: not KTAP: {line!r}")
    num = int(r.group("num"))
    if num != expected_num:
        raise KtapError(f"line {i}: test {num} out of sequence")
    if r.group("directive") == "SKIP" and r.group("ok") != "ok":
        raise KtapError(f"line {i}: SKIP on a 'not ok' line")
    return {"ok": r.group("ok") == "ok", "num": num, "desc": r.group("desc"),
            "directive": r.group("directive"), "reason": r.group("reason")}


def parse_ktap(text: str) -> dict[str, Any]:
    """Version line, one plan before any result, results numbered 1..N, count = plan, unless
    a `Bail out!` line (the run was cut short) ends the results; its reason is "bail_out"."""
    if not text.endswith("\n"):
        raise KtapError("output does not end with a newline")
    lines = text.split("\n")[:-1]
    if not lines or lines[0] != "KTAP version 1":
        raise KtapError(f"first line is not 'KTAP version 1': {lines[:1]}")
    plan: int | None = None
    plan_skip: str | None = None
    results: list[dict[str, Any]] = []
    bail_out: str | None = None
    for i, line in enumerate(lines[1:], 2):
        if line == "#" or line.startswith("# "):
            continue
        if bail_out is not None:
            raise KtapError(f"line {i}: a result after 'Bail out!'")
        if line.startswith("Bail out!"):
            bail_out = line.removeprefix("Bail out!").strip()
            continue
        m = _PLAN.fullmatch(line)
        if m is None:
            results.append(_ktap_result(line, i, len(results) + 1))
            continue
        if plan is not None:
            raise KtapError(f"line {i}: a second plan")
        if results:
            raise KtapError(f"line {i}: the plan comes after results")
        plan, plan_skip = int(m.group("n")), m.group("reason")
        if "# SKIP" in m.group(0) and plan != 0:
            raise KtapError(f"line {i}: a SKIP plan must be 1..0")
    if plan is None:
        raise KtapError("no plan")
    if len(results) != plan and (bail_out is None or len(results) > plan):
        raise KtapError(f"plan says {plan}, {len(results)} results")
    return {"plan": plan, "plan_skip": plan_skip, "results": results, "bail_out": bail_out}


# ---------------------------------------------------------------------------
# Golden files: KVMTDX_REGEN_GOLDEN=1 rewrites them from the current output.

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN_GOLDEN = os.environ.get("KVMTDX_REGEN_GOLDEN") == "1"


def assert_golden(name: str, text: str) -> None:
    """`text` is exactly tests/golden/NAME (rewritten instead when KVMTDX_REGEN_GOLDEN=1)."""
    path = GOLDEN / name
    if REGEN_GOLDEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path.name} is missing: run with KVMTDX_REGEN_GOLDEN=1 to write it"
    expected = path.read_text()
    assert text == expected, (
        f"output differs from golden/{name}; if the change is intended, rerun with "
        "KVMTDX_REGEN_GOLDEN=1 and review the diff of the golden file")


# ---------------------------------------------------------------------------
# Hosts: the max host with features taken away.


def host_without(name: str, cleared: dict[tuple[int, int | None], dict[str, int]] | None = None,
                 **facts: Any) -> Host:
    """MAX_HOST with the bits of `cleared` ({(leaf, sub-leaf): {register: mask}}) cleared and
    its MSR facts (tsx_ctrl, ept_5level, kvm_xfam ...) replaced: a realistic host that
    lacks a feature, still one every bundled module initialises on."""
    native = dict(MAX_HOST.native)
    for key, regs in (cleared or {}).items():
        values = list(MAX_HOST.cpuid(*key))
        for register, mask in regs.items():
            i = ("eax", "ebx", "ecx", "edx").index(register)
            values[i] &= ~mask
        native[key] = (values[0], values[1], values[2], values[3])
    return replace(MAX_HOST, name=name, native=native, **facts)


# The leaves TDH.SYS.INIT of every bundled module needs from a CPU (its CPUID checks), with
# the max host's values: the smallest host file a module initialises on.
SYS_INIT_LEAVES: tuple[tuple[int, int | None], ...] = (
    (0, None), (1, None), (4, 0), (4, 1), (4, 2), (4, 3), (7, 0), (7, 2), (0xA, None),
    (0xD, 0), (0xD, 1), (0x14, 0), (0x15, None), (0x1C, None), (0x1F, 0), (0x1F, 1),
    (0x80000000, None), (0x80000001, None), (0x80000006, None), (0x80000007, None),
    (0x80000008, None))


def small_host_json(name: str = "h") -> dict[str, Any]:
    """A host file in the user layout (eax..edx) with only SYS_INIT_LEAVES."""
    entries = [{"leaf": leaf, "subleaf": sub,
                **dict(zip(("eax", "ebx", "ecx", "edx"), MAX_HOST.cpuid(leaf, sub), strict=True))}
               for leaf, sub in SYS_INIT_LEAVES]
    return {"name": name, "ept_5level": True, "tsx_ctrl": False, "cpuid": entries}


# ---------------------------------------------------------------------------
# What every simulated Linux 6.16 to 7.3 kernel fails, the series included: a malformed leaf
# 0x1F reaches the TDX module, whose non-operand status KVM answers with -EIO and a WARN.
# Modules without topology enumeration (1.5.01) have no 0x1F rows: the check skips there.
WARN_CHECK = "init_vm_no_kernel_warn"


def warn_failures(module: str) -> set[str]:
    """The verify checks a simulated kernel fails on `module` for the WARN alone."""
    return {WARN_CHECK} if load_profile(module).enumerates_topology else set()


def mutant_policy(name: str) -> str:
    """The policy a seeded bug is run under: rfc-v2 where it applies (bugs of every kernel
    included), else the first policy whose answers it changes."""
    from kvmtdx.sim.mutants import BY_NAME

    policies = BY_NAME[name].policies
    return "rfc-v2" if "rfc-v2" in policies else policies[0]


# ---------------------------------------------------------------------------
# Reports of simulated runs, and the report page parsed as a browser's parser would.

MODULES = ("1.5.01", "1.5-late", "2.0")
POLICIES = ("upstream-6.16", "upstream", "rfc-v2")
UPSTREAM = ("upstream-6.16", "upstream")  # the kernels without the allowlist series
# The checks the denylist bypass fails: the three traps, and (on a backend with vCPUs) the
# bits it lets into the TD.
TRAP_CHECKS = ("adversarial_denylist_bypass_waitpkg", "adversarial_denylist_bypass_hle_rtm",
               "adversarial_denylist_bypass_stray_balance")
LEAK_CHECK = "effective_no_hidden_bits"
BYPASS_CHECKS = (*TRAP_CHECKS, LEAK_CHECK)


def grid_failures(module: str, kernel: str) -> set[str]:
    """The checks the simulated `module`:`kernel` fails: the bypass on the kernels without
    the series, the WARN on every kernel of a module with leaf 0x1F."""
    return (set(BYPASS_CHECKS) if kernel in UPSTREAM else set()) | warn_failures(module)


def grid_column(column: str | int) -> tuple[str, str]:
    """(module, kernel) of a column of the merged grid (numbered from 1)."""
    n = int(column) - 1
    return MODULES[n // len(POLICIES)], POLICIES[n % len(POLICIES)]


GRID_FAILURES = sum(len(grid_failures(m, p)) for m in MODULES for p in POLICIES)


def simulated_report(folder: Path, command: str, spec: str) -> Path:
    """`kvmtdx COMMAND --simulate SPEC --format json` written to FOLDER/COMMAND-SPEC.json."""
    out = folder / f"{command}-{spec.replace(':', '-')}.json"
    rc = cli.main([command, "--simulate", spec, "--format", "json", "--output", str(out)])
    verdict = json.loads(out.read_text())["verdict"]
    assert rc == {"pass": 0, "fail": 1}[verdict], (command, spec, rc, verdict)
    return out


def grid_reports(folder: Path) -> list[Path]:
    """verify --simulate for every module x policy, modules outer, in POLICIES order."""
    return [simulated_report(folder, "verify", f"{m}:{p}") for m in MODULES for p in POLICIES]


def parse_page(html: str) -> Any:
    """The page as html5lib's strict parser builds it (raises on any HTML parse error);
    elements without namespaces, SVG's too (see `tag`)."""
    import html5lib

    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(html)


def tag(element: Any) -> str:
    """An element's tag without its namespace (SVG elements keep theirs in html5lib)."""
    return str(element.tag).rpartition("}")[2]


def classes(element: Any) -> set[str]:
    return set(str(element.get("class", "")).split())


def find_all(root: Any, name: str, cls: str | None = None) -> list[Any]:
    return [e for e in root.iter() if tag(e) == name and (cls is None or cls in classes(e))]


def by_id(root: Any) -> dict[str, Any]:
    return {str(e.get("id")): e for e in root.iter() if e.get("id")}


def text_of(element: Any) -> str:
    return " ".join("".join(element.itertext()).split())


# ---------------------------------------------------------------------------
# README examples: a command's output as the README shows it.


def _line_matches(want: str, got: str) -> bool:
    if want.endswith(" ..."):
        return got.startswith(want[:-4])
    return want.rstrip() == got.rstrip()


def shown_in(expected: tuple[str, ...], actual: list[str]) -> bool:
    """Whether `actual` holds every run of `expected` between `...` lines, in order (a line
    ending in ` ...` stands for the rest of that line)."""
    chunks: list[list[str]] = [[]]
    for line in expected:
        if line == "...":
            chunks.append([])
        else:
            chunks[-1].append(line)
    pos = 0
    for chunk in (c for c in chunks if c):
        for start in range(pos, len(actual) - len(chunk) + 1):
            if all(_line_matches(w, actual[start + i]) for i, w in enumerate(chunk)):
                pos = start + len(chunk)
                break
        else:
            return False
    return True


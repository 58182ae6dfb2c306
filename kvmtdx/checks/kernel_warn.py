"""Requests that make the TDX module fail with a status other than an invalid operand, and
whether the kernel WARNs on them (spec section 4, step 10: Linux 6.16 to 7.3 answer such a
status with -EIO and a WARN_ON_ONCE splat, 7.3 also marks the VM bugged).

The evidence: a backend that counts WARN splats says so itself (`kernel_warnings`, the
simulated and kernel-source hosts).  A real kernel is asked through its log (/dev/kmsg,
the "SEAMCALL TDH_MNG_INIT failed" line) and by whether the VM still answers ioctls.  On a
real kernel the check provokes the WARN it looks for, which taints the kernel and, with
kernel.panic_on_warn=1, crashes the host: it runs only when asked (--allow-kernel-warn)
and never where panic_on_warn is set.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from kvmtdx.checks.context import Context
from kvmtdx.kmsg import SEAMCALL_FAILED, TAINT_WARN, LogUnreadable
from kvmtdx.model.builders import Trap
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import LEAF7_EBX_HLE, LEAF7_EBX_RTM, lowest_bit
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.session import kernel_warnings
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, CpuidEntry

TOPOLOGY_LEAF = 0x1F
CORE_LEVEL_1 = 0x201  # ECX of a core level (type 2) at level number 1
HLE_RTM = LEAF7_EBX_HLE | LEAF7_EBX_RTM
ALLOW_FLAG = "--allow-kernel-warn"
REPLAY_NOTE = ("on a real kernel this request provokes the kernel WARN: replaying it taints "
               "the kernel, and with kernel.panic_on_warn=1 crashes the host")


def real_kernel_gate(ctx: Context) -> str | None:
    """Why the check must not run here, on a kernel that does not count its WARNs."""
    if kernel_warnings(ctx.seam) is not None:
        return None
    if not ctx.allow_kernel_warn:
        return (f"on a real kernel this check provokes a kernel WARN, which taints the kernel "
                f"(and crashes it with kernel.panic_on_warn=1): run it with {ALLOW_FLAG}")
    panic = ctx.kernel_log.panic_on_warn()
    if panic is None:
        return (f"cannot read kernel.panic_on_warn ({ctx.kernel_log.panic_on_warn_path}): not "
                "provoking a WARN that might crash the host")
    if panic:
        return ("kernel.panic_on_warn is 1: the WARN this check provokes would crash the "
                "host, so it never runs here")
    return None


# ---------------------------------------------------------------------------
# The requests.


def malformed_topology(ctx: Context) -> Request | None:
    """Leaf 0x1F sub-leaf 0 all zero (the host's topology) but sub-leaf 1 set: every module
    that checks 0x1F refuses it with TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED."""
    rows = {e.index: e for e in ctx.caps.entries if e.function == TOPOLOGY_LEAF}
    if 0 not in rows or 1 not in rows or not rows[1].ecx:
        return None
    ecx = CORE_LEVEL_1 & rows[1].ecx or 1 << lowest_bit(rows[1].ecx)
    return ctx.base((CpuidEntry(TOPOLOGY_LEAF, 0, FLAG_SIGNIFICANT_INDEX),
                     CpuidEntry(TOPOLOGY_LEAF, 1, FLAG_SIGNIFICANT_INDEX, ecx=ecx)))


def tsx_without_ctrl(ctx: Context) -> tuple[str, Request] | None:
    """HLE+RTM reaching the module on a host without TSX_CTRL (TDX_INCORRECT_MSR_VALUE): as
    reported bits, or smuggled past a denylist; only where the mirror says one gets there."""
    if ctx.model() is None:
        return None
    direct = ctx.base((CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX, ebx=HLE_RTM),))
    steered = ctx.trap(Trap.STEER, ebx=HLE_RTM, ecx=0)
    for what, req in (("HLE+RTM on a host without TSX_CTRL", direct),
                      ("HLE+RTM steered past KVM's denylist, on a host without TSX_CTRL",
                       steered)):
        pred = ctx.predict_detail(req)
        if pred is not None and pred.warns:
            return what, req
    return None


def warn_requests(ctx: Context) -> list[tuple[str, Request]]:
    out: list[tuple[str, Request]] = []
    topology = malformed_topology(ctx)
    if topology is not None:
        out.append(("a malformed leaf 0x1F (sub-leaf 0 all zero, sub-leaf 1 set)", topology))
    tsx = tsx_without_ctrl(ctx)
    if tsx is not None:
        out.append(tsx)
    return out


# ---------------------------------------------------------------------------
# Sending them, and what the kernel did.


@dataclass
class Provoked:
    what: str
    request: Request
    outcome: Outcome
    vm_bugged: bool
    warnings: int | None  # counted by the backend
    lines: list[str] = field(default_factory=list)  # the kernel's SEAMCALL lines
    log_unreadable: str | None = None

    @property
    def warned(self) -> bool:
        if self.warnings is not None:
            return self.warnings > 0
        if self.log_unreadable is None:
            return bool(self.lines)
        # No log: TDX_BUG_ON always WARNs, and Linux 6.16 to 7.3 return -EIO for a failed
        # TDH.MNG.INIT only with a WARN.
        return self.vm_bugged or self.outcome.errno == errno.EIO

    def evidence(self) -> str:
        if self.warnings is not None:
            return f"{self.warnings} WARN splat(s) counted by the backend"
        if self.log_unreadable is not None:
            return (f"the kernel log is unreadable ({self.log_unreadable}): judged by the "
                    "-EIO and the VM's state")
        return "; ".join(self.lines) if self.lines else "no SEAMCALL line in the kernel log"


def provoke(ctx: Context, what: str, req: Request) -> Provoked:
    """One request on a fresh TD, with the kernel's WARNs and the VM's state after it."""
    before = kernel_warnings(ctx.seam)
    mark, unreadable = None, ctx.log_unreadable
    if before is None and unreadable is None:
        try:
            mark = ctx.kernel_log.mark()
        except LogUnreadable as e:
            unreadable = str(e)
    with ctx.td() as td:
        outcome = ctx.send(td, req)
        bugged = outcome.errno == errno.EIO and td.is_dead()
    after = kernel_warnings(ctx.seam)
    lines: list[str] = []
    if mark is not None:
        try:
            lines = [r.message for r in ctx.kernel_log.since(mark) if SEAMCALL_FAILED in r.message]
        except LogUnreadable as e:
            unreadable = str(e)
    counted = None if before is None or after is None else after - before
    return Provoked(what, req, outcome, bugged, counted, lines, unreadable)


def since_start(ctx: Context) -> list[str]:
    """Every SEAMCALL failure line the kernel logged since the run started."""
    if ctx.log_start is None:
        return []
    try:
        return [r.message for r in ctx.kernel_log.since(ctx.log_start)
                if SEAMCALL_FAILED in r.message]
    except LogUnreadable:
        return []


def tainted_note(ctx: Context, provoked: list[Provoked]) -> str:
    """On a real kernel: say that the check left it tainted."""
    if kernel_warnings(ctx.seam) is not None or not any(p.warned for p in provoked):
        return ""
    flags = ctx.kernel_log.tainted()
    known = "" if flags is None else f" (taint flags 0x{flags:x}"
    if flags is not None:
        known += ", W set)" if flags & TAINT_WARN else ")"
    return f"; the kernel is now tainted{known}"


def answered(p: Provoked) -> str:
    text = p.outcome.describe() if p.outcome.kind is not Kind.ACCEPTED else "ACCEPTED"
    if p.vm_bugged:
        text += ", VM marked bugged (every later ioctl -EIO)"
    return text

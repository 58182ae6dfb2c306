"""What the effective checks read and compare: the TD's CPUID, the bits KVM hides, the lies
set_cpuid2_consistency tells KVM_SET_CPUID2.  Helpers only; the checks are in `effective`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import Skip
from kvmtdx.device import TdCpuidRead, Vcpu
from kvmtdx.model import mirror
from kvmtdx.model.builders import Trap
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.get_cpuid import EntryKey, differing_registers, entry_label, entry_regs
from kvmtdx.model.profiles import enumerated
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import (
    LEAF7_EBX_HLE,
    LEAF7_EBX_RTM,
    LEAF7_ECX_WAITPKG,
    bits_of,
    is_value_register,
    lowest_bit,
)
from kvmtdx.model.td_diff import rows_of, smuggled
from kvmtdx.model.vcpu import with_bit
from kvmtdx.status import errno_name
from kvmtdx.structs import REGISTERS, CpuidEntry


def cpuid_of(read: TdCpuidRead | None) -> tuple[CpuidEntry, ...]:
    """The entries of a read, Skip where the backend cannot read a TD's CPUID at all, and an
    OSError (the runner's failure) where the kernel refused it."""
    if read is None:
        raise Skip("the request was not ACCEPTED (init_vm_all_reported_accepted judges that)")
    if read.unsupported:
        raise Skip(f"this backend reads no TD's CPUID ({read.describe()}): the kernel-source "
                   "host answers no vCPU ioctl, kernels before 6.16 have no KVM_TDX_GET_CPUID")
    if read.entries is None:
        raise OSError(read.errno, f"reading the TD's CPUID: {read.describe()}")
    return read.entries


def mismatches(got: Sequence[CpuidEntry], want: Sequence[CpuidEntry],
               unknown: dict[EntryKey, tuple[int, int, int, int]] | None = None) -> list[str]:
    """Per leaf: what differs between the TD's CPUID as read and as predicted (bits the
    profile does not know excused)."""
    key = {(e.function, e.index, e.flags): e for e in want}
    seen = {(e.function, e.index, e.flags): e for e in got}
    out = [f"{entry_label(e)} unexpected" for k, e in seen.items() if k not in key]
    out += [f"{entry_label(e)} missing" for k, e in key.items() if k not in seen]
    for k, e in seen.items():
        w = key.get(k)
        if w is None:
            continue
        excused = (unknown or {}).get(k, (0, 0, 0, 0))
        out += [f"{entry_label(e)} {r.upper()} 0x{a:08x}, expected 0x{b:08x}"
                for r, a, b in differing_registers(e, w, excused)]
    if not out and [(e.function, e.index) for e in got] != [(e.function, e.index) for e in want]:
        out.append("the leaves in another order")
    return out


def errno_of(fn: Callable[[], object]) -> int:
    """0, or the errno the call failed with; ENOTTY: the backend has no vCPU ioctls."""
    try:
        fn()
    except OSError as e:
        if e.errno == errno.ENOTTY:
            raise Skip("this backend answers no vCPU ioctl (ENOTTY): the kernel-source host "
                       "runs only KVM's VM-level TDX code") from None
        return e.errno or errno.EIO
    return 0


def absent(ctx: Context, req: Request, got: Sequence[CpuidEntry]) -> list[BitRef]:
    """Reported feature bits the request set that the TD's CPUID lacks."""
    out = []
    for row in ctx.caps.entries:
        asked = mirror.find(req.init_vm.entries, row.function, row.index)
        sub = ctx.subleaf_of(row.function, row.index)
        have = entry_regs(got, row.function, sub)
        if asked is None or have is None:
            continue
        for r, a, rep, h in zip(REGISTERS, asked.regs(), row.regs(), have, strict=True):
            if not is_value_register(row.function, sub, r):
                out += [BitRef(row.function, sub, r, b) for b in bits_of(a & rep & ~h)]
    return out


def cleared_by_module(ctx: Context, req: Request) -> dict[BitRef, str]:
    """Bits the module model says TDH.MNG.INIT clears or overrides for this request."""
    pred = ctx.predict_detail(req)
    if pred is None:
        return {}
    return {BitRef(c.leaf, c.subleaf, c.register, b): f"{c.kind}: {c.reason}"
            for c in pred.changes if c.kind in ("cleared", "overridden")
            for b in bits_of(c.mask)}


def hidden_masks(ctx: Context) -> dict[tuple[int, int], tuple[int, int, int, int]] | None:
    """Per reported row: the bits the module lists and KVM does not report (None without a
    module profile, when only the requested bits can say)."""
    k = ctx.know
    if k.module is None or k.host is None:
        return None
    listed = enumerated(k.module, k.host)
    out: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for i, row in enumerate(k.module.rows):
        rep = next((e.regs() for e in ctx.caps.entries
                    if (e.function, e.index) == (row.leaf, row.kvm_index)), (0, 0, 0, 0))
        a, b, c, d = (x & ~y for x, y in zip(listed[i], rep, strict=True))
        out[(row.leaf, row.kvm_index)] = (a, b, c, d)
    return out


def leaked(ctx: Context, req: Request, got: Sequence[CpuidEntry]) -> list[BitRef]:
    """Bits KVM hides that the TD's CPUID has (feature registers only); without a module
    profile, the requested bits KVM did not report."""
    hidden = hidden_masks(ctx)
    if hidden is None:
        return list(smuggled(rows_of(ctx.know.module, ctx.caps.entries), ctx.caps.entries,
                             req.init_vm.entries, got))
    out = []
    for row in ctx.caps.entries:
        sub = ctx.subleaf_of(row.function, row.index)
        have = entry_regs(got, row.function, sub)
        if have is None:
            continue
        masks = hidden.get((row.function, row.index), (0, 0, 0, 0))
        for r, h, mask in zip(REGISTERS, have, masks, strict=True):
            if not is_value_register(row.function, sub, r):
                out += [BitRef(row.function, sub, r, b) for b in bits_of(h & mask)]
    return out


def requests_to_read(ctx: Context) -> list[Request]:
    """Every request the suite saw ACCEPTED, plus the lookup traps (ACCEPTED where the
    kernel has the hole), so the group run alone still asks them."""
    traps = [ctx.trap(Trap.STEER, ebx=0, ecx=LEAF7_ECX_WAITPKG),
             ctx.trap(Trap.STEER, ebx=LEAF7_EBX_HLE | LEAF7_EBX_RTM, ecx=0),
             ctx.trap(Trap.STRAY, ebx=0, ecx=LEAF7_ECX_WAITPKG)]
    return list(dict.fromkeys([*ctx.accepted, *traps]))



OPEN = ("KVM's own view of the guest is not held to the TD's CPUID: the series leaves "
        "KVM_SET_CPUID2 unvalidated (its cover letter's Open item)")


@dataclass(frozen=True, slots=True)
class Lie:
    what: str  # what the CPUID claims, for people
    bit: BitRef
    on: bool  # the CPUID claims the bit (else it leaves out a bit the TD has)


def _regs(entries: tuple[CpuidEntry, ...], leaf: int, subleaf: int | None
          ) -> tuple[int, int, int, int]:
    regs = entry_regs(entries, leaf, subleaf)
    return regs if regs is not None else (0, 0, 0, 0)


def _hidden_lie(ctx: Context, td: tuple[int, int, int, int],
                rep: tuple[int, int, int, int]) -> Lie | None:
    """WAITPKG where KVM hides it and the TD lacks it, else another such bit of leaf 7.0
    (without a module profile: one KVM does not report)."""
    masks = hidden_masks(ctx)
    hidden = masks.get((7, 0), (0, 0, 0, 0)) if masks is not None else tuple(
        ~r & 0xFFFFFFFF for r in rep)
    what = "a bit KVM hides and the TD lacks" if masks is not None else \
        "a bit KVM does not report and the TD lacks"
    if hidden[2] & ~td[2] & LEAF7_ECX_WAITPKG:
        return Lie(what, BitRef(7, 0, "ecx", 5), True)
    for i, r in enumerate(REGISTERS[1:], 1):
        if hidden[i] & ~td[i]:
            return Lie(what, BitRef(7, 0, r, lowest_bit(hidden[i] & ~td[i])), True)
    return None


def _lacking_lie(ctx: Context, theirs: tuple[CpuidEntry, ...], used: set[BitRef]
                 ) -> Lie | None:
    """A bit KVM reports that this TD lacks (the module cleared or overrode it), in any
    reported row; else one the module lets a VMM configure (with a profile)."""
    masks = hidden_masks(ctx) or {}
    for wanted, what in ((lambda row: row.regs(), "a reported bit the TD lacks"),
                         (lambda row: masks.get((row.function, row.index), (0, 0, 0, 0)),
                          "a configurable bit the TD lacks")):
        for row in ctx.caps.entries:
            sub = ctx.subleaf_of(row.function, row.index)
            have = _regs(theirs, row.function, sub)
            for r, w, h in zip(REGISTERS, wanted(row), have, strict=True):
                if is_value_register(row.function, sub, r):
                    continue
                for b in bits_of(w & ~h):
                    if BitRef(row.function, sub, r, b) not in used:
                        return Lie(what, BitRef(row.function, sub, r, b), True)
    return None


def lies(ctx: Context, theirs: tuple[CpuidEntry, ...]) -> list[Lie]:
    """A hidden bit the TD lacks, another configurable bit it lacks, and a reported bit of
    leaf 7.0 EBX the TD has, left out."""
    td = _regs(theirs, 7, 0)
    reported = ctx.leaf7()
    rep = reported.regs() if reported is not None else (0, 0, 0, 0)
    out = [lie for lie in (_hidden_lie(ctx, td, rep),) if lie is not None]
    lacking = _lacking_lie(ctx, theirs, {lie.bit for lie in out})
    if lacking is not None:
        out.append(lacking)
    if td[1] & rep[1]:
        out.append(Lie("without a bit the TD has", BitRef(7, 0, "ebx",
                                                          lowest_bit(td[1] & rep[1])), False))
    return out


def try_lie(vcpu: Vcpu, base: tuple[CpuidEntry, ...], lie: Lie) -> str:
    """What KVM did with the lie: refused (its errno), or took it into its own view."""
    b = lie.bit
    err = vcpu.set_cpuid2(with_bit(base, b.leaf, b.subleaf, b.register, b.bit, lie.on))
    if err:
        return f"refused ({errno_name(err)})"
    view = _regs(vcpu.get_cpuid2(), lie.bit.leaf, lie.bit.subleaf)
    kept = view[REGISTERS.index(lie.bit.register)] >> lie.bit.bit & 1
    return "accepted" + (", KVM_GET_CPUID2 shows it" if kept == lie.on else "")



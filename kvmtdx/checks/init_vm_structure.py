"""init_vm_structure: KVM_TDX_INIT_VM's structural rules (spec section 4's checks in order),
each judged by the mirror when the module is known, else by the kind every kernel gives."""

from __future__ import annotations

import errno

from kvmtdx.checks import kernel_warn
from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import (
    NEEDS_MODULE,
    Verdict,
    bad,
    check,
    describe,
    judge,
    ok,
    skip,
)
from kvmtdx.model.builders import STRAY_LEAF, strays
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import is_value_register, lowest_bit
from kvmtdx.outcome import Kind
from kvmtdx.status import Operand, errno_name
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry
from kvmtdx.verdict import Status

GROUP = "init_vm_structure"
_WORD_64 = 0xFFFFFFFFFFFFFFFF


def _structure(ctx: Context, what: str, req: Request, generic: Kind | None) -> Verdict:
    return judge(ctx, req, ctx.attempt(req), generic, what)


@check("init_vm_minimal_accepted", GROUP,
       "attributes 0, the reported XFAM and a GPAW-48 entry are ACCEPTED")
def init_vm_minimal_accepted(ctx: Context) -> Verdict:
    return _structure(ctx, "minimal request", ctx.base(), Kind.ACCEPTED)


@check("init_vm_hw_error_rejected", GROUP,
       "cmd.hw_error != 0 is EINVAL and cmd is not written back")
def init_vm_hw_error_rejected(ctx: Context) -> Verdict:
    req = ctx.base(hw_error=1)
    with ctx.td() as td:
        res = td.init_vm_raw(req.init_vm, hw_error=1)
    got = errno_name(res.errno)
    if res.errno != errno.EINVAL:
        return bad(f"hw_error 1: {got}, expected EINVAL", "EINVAL", got)
    if res.cmd.hw_error != 1:
        return bad(f"EINVAL, but cmd was written back (hw_error 0x{res.cmd.hw_error:x}); "
                   "KVM must refuse before touching it", "hw_error 1 left",
                   f"hw_error 0x{res.cmd.hw_error:x}")
    return ok("hw_error 1: EINVAL, cmd left alone", "EINVAL", got)


@check("init_vm_flags_rejected", GROUP, "cmd.flags != 0 is EINVAL")
def init_vm_flags_rejected(ctx: Context) -> Verdict:
    return _structure(ctx, "flags 1", ctx.base(flags=1), Kind.KVM_REJECTED)


@check("init_vm_reserved_rejected", GROUP, "a non-zero reserved word is EINVAL")
def init_vm_reserved_rejected(ctx: Context) -> Verdict:
    results = []
    for i in (0, 11):
        words = tuple(1 if j == i else 0 for j in range(12))
        results.append(_structure(ctx, f"reserved[{i}] = 1", ctx.base(reserved=words),
                                  Kind.KVM_REJECTED))
    return next((r for r in results if r.status is not Status.PASS), results[0])


@check("init_vm_padding_rejected", GROUP, "cpuid.padding != 0 is EINVAL")
def init_vm_padding_rejected(ctx: Context) -> Verdict:
    return _structure(ctx, "cpuid.padding = 1", ctx.base(cpuid_padding=1), Kind.KVM_REJECTED)


@check("init_vm_nent_over_256_rejected", GROUP, "nent 257 is E2BIG")
def init_vm_nent_over_256_rejected(ctx: Context) -> Verdict:
    return _structure(ctx, "nent 257", ctx.base(nent=257), Kind.ERROR)


@check("init_vm_nent_256_not_e2big", GROUP,
       "nent 256 is within the limit: the count check refuses it, not E2BIG")
def init_vm_nent_256_not_e2big(ctx: Context) -> Verdict:
    req = ctx.base(strays(255))
    return _structure(ctx, "nent 256 (255 stray entries)", req, Kind.KVM_REJECTED)


@check("init_vm_unlisted_leaf_rejected", GROUP,
       "an entry no module row takes breaks the count: EINVAL")
def init_vm_unlisted_leaf_rejected(ctx: Context) -> Verdict:
    return _structure(ctx, f"stray leaf 0x{STRAY_LEAF:x}", ctx.base(strays(1)),
                      Kind.KVM_REJECTED)


@check("init_vm_attributes_unsupported_rejected", GROUP,
       "an attribute outside supported_attrs is EINVAL")
def init_vm_attributes_unsupported_rejected(ctx: Context) -> Verdict:
    bit = lowest_bit(~ctx.caps.supported_attrs & _WORD_64)
    return _structure(ctx, f"attribute bit {bit}", ctx.base(attributes=1 << bit),
                      Kind.KVM_REJECTED)


@check("init_vm_xfam_unsupported_rejected", GROUP,
       "an XFAM bit outside supported_xfam is EINVAL")
def init_vm_xfam_unsupported_rejected(ctx: Context) -> Verdict:
    outside = ~ctx.caps.supported_xfam & _WORD_64
    if not outside:
        return skip("every XFAM bit is supported")
    bit = lowest_bit(outside)
    return _structure(ctx, f"XFAM bit {bit}", ctx.base(xfam=ctx.caps.supported_xfam | 1 << bit),
                      Kind.KVM_REJECTED)


@check("init_vm_gpaw_missing_rejected", GROUP, "no CPUID 0x80000008 entry (no GPAW) is EINVAL")
def init_vm_gpaw_missing_rejected(ctx: Context) -> Verdict:
    return _structure(ctx, "no GPAW entry", ctx.base(gpaw=None), Kind.KVM_REJECTED)


@check("init_vm_gpaw_invalid_rejected", GROUP, "a GPAW other than 48 or 52 is EINVAL")
def init_vm_gpaw_invalid_rejected(ctx: Context) -> Verdict:
    return _structure(ctx, "GPAW 40", ctx.base(gpaw=40), Kind.KVM_REJECTED)


@check("init_vm_gpaw_52", GROUP, "GPAW 52 is ACCEPTED with 5-level EPT, else EINVAL")
def init_vm_gpaw_52(ctx: Context) -> Verdict:
    if not ctx.know.host_exact:
        return skip("needs the host's 5-level EPT support: give --host FILE")
    return _structure(ctx, "GPAW 52", ctx.base(gpaw=52), None)


@check("init_vm_second_call_rejected", GROUP, "a second INIT_VM on an initialised TD is EINVAL")
def init_vm_second_call_rejected(ctx: Context) -> Verdict:
    req = ctx.base()
    with ctx.td() as td:
        first = ctx.send(td, req)
        if first.kind != Kind.ACCEPTED:
            return skip(f"the first INIT_VM was not accepted ({describe(first)}); "
                        "init_vm_minimal_accepted reports it")
        second = ctx.send(td, req)
    return judge(ctx, req, second, Kind.KVM_REJECTED, "second INIT_VM", td_initialized=True)


def _module_refused_bit(ctx: Context) -> tuple[CpuidEntry, BitRef] | None:
    """A bit of a listed feature register (leaf 7 aside) that the module itself refuses."""
    m = ctx.know.module
    if m is None:
        return None
    for i, row in enumerate(m.rows):
        for j, (r, allowed) in enumerate(zip(REGISTERS, row.module_allows(), strict=True)):
            if is_value_register(row.leaf, row.subleaf, r) or row.leaf == 7:
                continue
            free = ~allowed & ~m.unknown_mask(i)[j] & 0xFFFFFFFF
            if free:
                b = lowest_bit(free)
                e = CpuidEntry(row.leaf, row.kvm_index, FLAG_SIGNIFICANT_INDEX).with_reg(r, 1 << b)
                return e, BitRef(row.leaf, row.subleaf, r, b)
    return None


@check("init_vm_module_status_written_back", GROUP,
       "a module refusal comes back as EINVAL with the TDX status in cmd.hw_error")
def init_vm_module_status_written_back(ctx: Context) -> Verdict:
    found = _module_refused_bit(ctx)
    if found is None:
        return skip(NEEDS_MODULE if ctx.know.module is None
                    else "no bit the module refuses in a listed row")
    e, ref = found
    req = ctx.base((e,))
    actual = ctx.attempt(req)
    v = judge(ctx, req, actual, None, f"{ref.label()} (not configurable)", bits=(ref,))
    if v.status is Status.PASS and actual.hw.operand != Operand.CPUID_CONFIG:
        return bad(f"hw_error {actual.hw}, expected operand CPUID_CONFIG", v.expected,
                   v.actual, (ref,))
    return v


@check("init_vm_no_kernel_warn", GROUP,
       "a request the module fails with a status other than an invalid operand (a malformed "
       "leaf 0x1F; virtual TSX without TSX_CTRL, where it reaches the module) is refused "
       "without a kernel WARN")
def init_vm_no_kernel_warn(ctx: Context) -> Verdict:
    gate = kernel_warn.real_kernel_gate(ctx)
    if gate is not None:
        return skip(gate)
    requests = kernel_warn.warn_requests(ctx)
    if not requests:
        return skip("no request reaches a non-operand module failure here (the module lists "
                    "no leaf 0x1F rows, and no TSX request reaches it on a host without "
                    "TSX_CTRL" + ("" if ctx.exact else f": {NEEDS_MODULE}") + ")")
    provoked = [kernel_warn.provoke(ctx, what, req) for what, req in requests]
    tail = kernel_warn.tainted_note(ctx, provoked)
    earlier = kernel_warn.since_start(ctx)
    if earlier:
        tail += f"; {len(earlier)} SEAMCALL failure line(s) in the kernel log since the run began"
    wrong = [p for p in provoked if p.warned or p.outcome.kind is Kind.ACCEPTED]
    if not wrong:
        done = "; ".join(f"{p.what}: {kernel_warn.answered(p)}" for p in provoked)
        return ok(f"refused without a kernel WARN: {done}{tail}", "refused, no WARN",
                  "; ".join(describe(p.outcome) for p in provoked))
    p = wrong[0]
    if not p.warned:
        return bad(f"{p.what} was ACCEPTED: no module takes it{tail}", "refused, no WARN",
                   "ACCEPTED")
    return bad(f"{p.what}: {kernel_warn.answered(p)} with a kernel WARN ({p.evidence()}): a "
               f"WARN userspace can trigger is a kernel bug{tail}", "refused, no WARN",
               f"{describe(p.outcome)}, kernel WARN")

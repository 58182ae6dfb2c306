"""init_vm_structure: KVM_TDX_INIT_VM's structural rules (spec section 4's checks in order),
each judged by the mirror when the module is known, else by the kind every kernel gives."""

from __future__ import annotations

import errno

from kvmtdx.checks import kernel_warn
from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import (
    Verdict,
    bad,
    check,
    describe,
    judge,
    ok,
    skip,
)
from kvmtdx.checks.sweep import Sweep
from kvmtdx.model import builders
from kvmtdx.model.builders import STRAY_LEAF, strays
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import bits_of, is_value_register, lowest_bit
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
        return bad(f"hw_error 1: {got}, expected EINVAL", "EINVAL", got, request=req)
    if res.cmd.hw_error != 1:
        return bad(f"EINVAL, but cmd was written back (hw_error 0x{res.cmd.hw_error:x}); "
                   "KVM must refuse before touching it", "hw_error 1 left",
                   f"hw_error 0x{res.cmd.hw_error:x}", request=req)
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


def module_refused_bit(ctx: Context) -> tuple[CpuidEntry, BitRef] | None:
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
    found = module_refused_bit(ctx)
    if found is None:
        return skip(ctx.needs_module if ctx.know.module is None
                    else "no bit the module refuses in a listed row")
    e, ref = found
    req = ctx.base((e,))
    actual = ctx.attempt(req)
    v = judge(ctx, req, actual, None, f"{ref.label()} (not configurable)", bits=(ref,))
    if v.status is Status.PASS and actual.hw.operand != Operand.CPUID_CONFIG:
        return bad(f"hw_error {actual.hw}, expected operand CPUID_CONFIG", v.expected,
                   v.actual, (ref,), request=req)
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
                    "TSX_CTRL" + ("" if ctx.exact else f": {ctx.needs_module}") + ")")
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
    warned = [p for p in wrong if p.warned]
    if not warned:
        return bad(f"{wrong[0].what} was ACCEPTED: no module takes it{tail}",
                   "refused, no WARN", "ACCEPTED", request=wrong[0].request)
    said = "; ".join(f"{p.what}: {kernel_warn.answered(p)} with a kernel WARN ({p.evidence()})"
                     for p in warned)
    return bad(f"{said}: a WARN userspace can trigger is a kernel bug{tail}",
               "refused, no WARN", f"{describe(warned[0].outcome)}, kernel WARN",
               request=warned[0].request, request_note=kernel_warn.REPLAY_NOTE)


# ---------------------------------------------------------------------------
# The other direction: legal requests in encodings a kernel must not mistake for bad ones.


def _accepted(ctx: Context, what: str, req: Request) -> Verdict:
    return judge(ctx, req, ctx.attempt(req), Kind.ACCEPTED, what)


@check("init_vm_ignored_flag_bits_accepted", GROUP,
       "every reported bit, each entry with flag bits the CPUID lookup ignores "
       "(STATEFUL_FUNC, STATE_READ_NEXT) set too, is ACCEPTED")
def init_vm_ignored_flag_bits_accepted(ctx: Context) -> Verdict:
    return _accepted(ctx, f"flags |= 0x{builders.IGNORED_FLAG_BITS:x} on every entry",
                     builders.with_flag_bits(ctx.full_request()))


@check("init_vm_ignored_index_accepted", GROUP,
       "every reported bit, each leaf with one row sent unflagged with an index the lookup "
       "ignores (0xffffffff, 1, 0x80000000), is ACCEPTED")
def init_vm_ignored_index_accepted(ctx: Context) -> Verdict:
    return _accepted(ctx, "one-row leaves unflagged with ignored indexes",
                     builders.with_ignored_indexes(ctx.full_request()))


@check("init_vm_measurements_accepted", GROUP,
       "non-zero MRCONFIGID, MROWNER and MROWNERCONFIG (not reserved words) are ACCEPTED")
def init_vm_measurements_accepted(ctx: Context) -> Verdict:
    return _accepted(ctx, "SHA-384 values in MRCONFIGID, MROWNER, MROWNERCONFIG",
                     builders.with_measurements(ctx.base()))


# ---------------------------------------------------------------------------
# Whole domains: every value a field can take that a kernel must refuse, one TD each where a
# bug could single one out.


def _each_unsupported_bit(ctx: Context, field: str, supported: int) -> Verdict:
    """Each bit of a 64-bit field (attributes, or XFAM on top of the reported XFAM) that
    KVM did not report, alone on its own TD: a bug may drop any one bit, or a whole half."""
    t = Sweep(f"unsupported {field} bits")
    for b in bits_of(~supported & _WORD_64, 64):
        req = (ctx.base(attributes=1 << b) if field == "attribute"
               else ctx.base(xfam=supported | 1 << b))
        t.send(ctx, f"{field} bit {b}", req, Kind.KVM_REJECTED)
    return t.verdict()


@check("init_vm_attributes_each_bit_rejected", GROUP,
       "each of the 64 attribute bits outside supported_attrs, alone on its own TD, is "
       "refused by KVM (EINVAL)")
def init_vm_attributes_each_bit_rejected(ctx: Context) -> Verdict:
    return _each_unsupported_bit(ctx, "attribute", ctx.caps.supported_attrs)


@check("init_vm_xfam_each_bit_rejected", GROUP,
       "each of the 64 XFAM bits outside supported_xfam, with the reported XFAM, alone on its "
       "own TD, is refused by KVM (EINVAL)")
def init_vm_xfam_each_bit_rejected(ctx: Context) -> Verdict:
    return _each_unsupported_bit(ctx, "XFAM", ctx.caps.supported_xfam)


# Widths around and between 48 and 52, and the values a field read with the wrong width or
# shift (bits 22:16, 21:16, 19:16) would mistake for 48 or 52.
GPAW_INVALID = (0, 1, 32, 39, 40, 47, 49, 50, 51, 53, 56, 57, 63, 64, 0x70, 0x74, 0xB0, 0xB4,
                0xF0, 0xFF)


@check("init_vm_gpaw_domain_rejected", GROUP,
       "every GPAW around and between the valid widths 48 and 52 (0, 1, 47, 49-51, 53, 57, "
       "0xff, and aliases of 48/52 under a wrong field width) is refused by KVM")
def init_vm_gpaw_domain_rejected(ctx: Context) -> Verdict:
    t = Sweep("invalid GPAW values")
    for g in GPAW_INVALID:
        t.send(ctx, f"GPAW {g}", ctx.base(gpaw=g), Kind.KVM_REJECTED)
    return t.verdict()


@check("init_vm_nent_limits", GROUP,
       "nent around every limit: 0 (no GPAW entry) and 255 (strays) refused by KVM; 258, "
       "0x80000000 and 0xffffffff E2BIG (an unsigned compare)")
def init_vm_nent_limits(ctx: Context) -> Verdict:
    t = Sweep("nent values")
    t.send(ctx, "nent 0", ctx.base(gpaw=None), Kind.KVM_REJECTED)
    t.send(ctx, "nent 255 (254 strays)", ctx.base(strays(254)), Kind.KVM_REJECTED)
    for n in (258, 0x80000000, 0xFFFFFFFF):
        t.send(ctx, f"nent 0x{n:x}", ctx.base(nent=n), Kind.ERROR, errno_=errno.E2BIG)
    return t.verdict()


@check("init_vm_reserved_each_word_rejected", GROUP,
       "each of the 12 reserved words with its lowest and with its highest bit set, and "
       "cpuid.padding's highest bit, one TD each, is refused by KVM (EINVAL)")
def init_vm_reserved_each_word_rejected(ctx: Context) -> Verdict:
    t = Sweep("reserved words")
    for i in range(12):
        for bit in (0, 63):
            words = tuple(1 << bit if j == i else 0 for j in range(12))
            t.send(ctx, f"reserved[{i}] bit {bit}", ctx.base(reserved=words), Kind.KVM_REJECTED)
    t.send(ctx, "cpuid.padding bit 31", ctx.base(cpuid_padding=1 << 31), Kind.KVM_REJECTED)
    return t.verdict()

"""effective: what the TD really gets, read back through a vCPU (KVM_TDX_GET_CPUID).

INIT_VM's return code is not the whole truth: the TDX module clears configured bits
silently and forces others, and a kernel bug can let a hidden bit through with a plain 0.
After an accepted INIT_VM a VMM splits the irqchip, creates a vCPU and reads the TD's CPUID
from the module (Linux 6.16+; arch/x86/kvm/vmx/tdx.c tdx_vcpu_get_cpuid).  These checks do
the same: the vCPU path's own rules (tdx_vcpu_create, tdx_vcpu_init, E2BIG), the TD's CPUID
against the mirror's (kvmtdx.model.get_cpuid), every requested bit present unless the
module's rules clear it, and no bit KVM hides in the TD after ANY request the suite saw
ACCEPTED.  A backend without vCPU ioctls (the kernel-source host answers ENOTTY) skips them.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable, Sequence

from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import Skip, Verdict, bad, check, labels, ok, skip
from kvmtdx.device import TdCpuidRead, TdxVm, Vcpu
from kvmtdx.model import mirror
from kvmtdx.model.builders import Trap
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.get_cpuid import entry_regs, predicted
from kvmtdx.model.profiles import enumerated
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import LEAF7_EBX_HLE, LEAF7_EBX_RTM, LEAF7_ECX_WAITPKG, bits_of
from kvmtdx.model.rules import is_value_register as value_register
from kvmtdx.outcome import Kind
from kvmtdx.status import errno_name
from kvmtdx.structs import REGISTERS, CpuidEntry

GROUP = "effective"
XTILEDATA = 1 << 18  # CPUID 0xD.0 EAX: dynamic XSAVE state, needs the FPU's guest permission


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


def quirk_free(entries: Iterable[CpuidEntry]) -> tuple[CpuidEntry, ...]:
    """The TD's CPUID as KVM_SET_CPUID2 takes it from a process that has not asked for AMX
    guest permission (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM): XTILEDATA left out of 0xD.0."""
    return tuple(e.with_reg("eax", e.eax & ~XTILEDATA) if (e.function, e.index) == (0xD, 0)
                 else e for e in entries)


def _entry_label(e: CpuidEntry) -> str:
    return f"0x{e.function:x}" + (f".{e.index}" if e.significant_index else "")


def _mismatches(got: Sequence[CpuidEntry], want: Sequence[CpuidEntry]) -> list[str]:
    """Per leaf: what differs between the TD's CPUID as read and as predicted."""
    key = {(e.function, e.index, e.flags): e for e in want}
    seen = {(e.function, e.index, e.flags): e for e in got}
    out = [f"{_entry_label(e)} unexpected" for k, e in seen.items() if k not in key]
    out += [f"{_entry_label(e)} missing" for k, e in key.items() if k not in seen]
    for k, e in seen.items():
        w = key.get(k)
        if w is None:
            continue
        for r, a, b in zip(REGISTERS, e.regs(), w.regs(), strict=True):
            if a != b:
                out.append(f"{_entry_label(e)} {r.upper()} 0x{a:08x}, expected 0x{b:08x}")
    if not out and [(e.function, e.index) for e in got] != [(e.function, e.index) for e in want]:
        out.append("the leaves in another order")
    return out


# ---------------------------------------------------------------------------
# The vCPU path's own rules.


def _errno(fn: Callable[[], object]) -> int:
    """0, or the errno the call failed with; ENOTTY: the backend has no vCPU ioctls."""
    try:
        fn()
    except OSError as e:
        if e.errno == errno.ENOTTY:
            raise Skip("this backend answers no vCPU ioctl (ENOTTY): the kernel-source host "
                       "runs only KVM's VM-level TDX code") from None
        return e.errno or errno.EIO
    return 0


def _vcpu_steps(ctx: Context, td: TdxVm) -> list[tuple[str, str, str]]:
    """(step, expected, got) of creating a vCPU on one TD, up to splitting the irqchip."""
    def create() -> None:
        td.create_vcpu(0).close()

    steps = [("KVM_CREATE_VCPU before INIT_VM", "EIO", errno_name(_errno(create)))]
    if ctx.send(td, ctx.base()).kind is not Kind.ACCEPTED:
        raise Skip("the minimal request was not ACCEPTED (init_vm_minimal_accepted judges that)")
    steps.append(("KVM_CREATE_VCPU without a split irqchip", "EINVAL",
                  errno_name(_errno(create))))
    steps.append(("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)", "success",
                  errno_name(_errno(td.enable_split_irqchip))))
    return steps


def _init_vcpu_steps(vcpu: Vcpu) -> list[tuple[str, str, str]]:
    theirs = vcpu.tdx_get_cpuid()
    no_cpuid = vcpu.tdx_init_vcpu().errno
    set_err = vcpu.set_cpuid2(quirk_free(theirs))
    first, again = vcpu.tdx_init_vcpu().errno, vcpu.tdx_init_vcpu().errno
    return [("KVM_TDX_INIT_VCPU before KVM_SET_CPUID2 (no x2APIC)", "EINVAL",
             errno_name(no_cpuid)),
            ("KVM_SET_CPUID2 with the TD's CPUID", "success", errno_name(set_err)),
            ("KVM_TDX_INIT_VCPU", "success", errno_name(first)),
            ("KVM_TDX_INIT_VCPU again", "EINVAL", errno_name(again))]


@check("effective_vcpu_lifecycle", GROUP,
       "a TD vCPU needs an initialised TD (EIO) and a split irqchip (EINVAL); "
       "KVM_TDX_INIT_VCPU needs x2APIC in the CPUID KVM_SET_CPUID2 gave, once per vCPU")
def effective_vcpu_lifecycle(ctx: Context) -> Verdict:
    with ctx.td() as td:
        steps = _vcpu_steps(ctx, td)
        try:
            with td.create_vcpu(0) as vcpu:
                steps.append(("KVM_CREATE_VCPU", "success", "success"))
                steps += _init_vcpu_steps(vcpu)
        except OSError as e:
            steps.append(("KVM_CREATE_VCPU", "success", errno_name(e.errno or errno.EIO)))
    expected = "; ".join(f"{s}: {w}" for s, w, _ in steps)
    actual = "; ".join(f"{s}: {g}" for s, _, g in steps)
    wrong = [f"{s}: {g}, expected {w}" for s, w, g in steps if w != g]
    if wrong:
        return bad("; ".join(wrong), expected, actual)
    return ok(actual, expected, actual)


@check("effective_get_cpuid_e2big", GROUP,
       "KVM_TDX_GET_CPUID one entry short is E2BIG with the count it needs in nent and no "
       "entry written; a caller's hw_error is refused (EINVAL)")
def effective_get_cpuid_e2big(ctx: Context) -> Verdict:
    with ctx.td() as td:
        if ctx.send(td, ctx.base()).kind is not Kind.ACCEPTED:
            return skip("the minimal request was not ACCEPTED")
        count = len(cpuid_of(td.read_cpuid()))
        with td.create_vcpu(1) as vcpu:
            fill = (count - 1).to_bytes(4, "little") + b"\x5a" * 4 + b"\xa5" * 40 * (count - 1)
            short = vcpu.tdx_get_cpuid_raw(0, fill=fill)
            hw = vcpu.tdx_get_cpuid_raw(count, hw_error=1)
    want = (f"E2BIG, nent {count}, padding and entries untouched; hw_error: EINVAL")
    told = int.from_bytes(short.data[:4], "little")
    got = (f"{errno_name(short.errno)}, nent {told}, padding and entries "
           + ("untouched" if short.data[4:] == fill[4:] else "written")
           + f"; hw_error: {errno_name(hw.errno)}")
    if got != want:
        return bad(got, want, got)
    return ok(got, want, got)


# ---------------------------------------------------------------------------
# The TD's CPUID.


@check("effective_matches_prediction", GROUP,
       "after the every-reported-bit request, the TD's CPUID (KVM_TDX_GET_CPUID) is the "
       "mirror's prediction, leaf by leaf")
def effective_matches_prediction(ctx: Context) -> Verdict:
    m = ctx.model()
    if m is None:
        return skip(ctx.needs_module)
    req = ctx.full_request()
    pred = mirror.init_vm_prediction(*m, req)
    want = predicted(m[0].tables, pred)
    if want is None:
        return skip(f"the mirror does not foresee a readable TD ({pred.outcome.describe()})")
    _, read = ctx.td_cpuid(req)
    got = cpuid_of(read)
    diffs = _mismatches(got, want)
    summary = f"{len(want)} entries from leaf 0 to 0x{want[-1].function:x}"
    if diffs:
        return bad(f"the TD's CPUID is not the mirror's: {'; '.join(diffs[:6])}"
                   + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""),
                   summary, f"{len(got)} entries, {len(diffs)} differing", request=req)
    return ok(f"the TD's CPUID is the mirror's: {summary}", summary, summary)


def _absent(ctx: Context, req: Request, got: Sequence[CpuidEntry]) -> list[BitRef]:
    """Reported feature bits the request set that the TD's CPUID lacks."""
    out = []
    for row in ctx.caps.entries:
        asked = mirror.find(req.init_vm.entries, row.function, row.index)
        sub = ctx.subleaf_of(row.function, row.index)
        have = entry_regs(got, row.function, sub)
        if asked is None or have is None:
            continue
        for r, a, rep, h in zip(REGISTERS, asked.regs(), row.regs(), have, strict=True):
            if not value_register(row.function, sub, r):
                out += [BitRef(row.function, sub, r, b) for b in bits_of(a & rep & ~h)]
    return out


def _cleared_by_module(ctx: Context, req: Request) -> dict[BitRef, str]:
    """Bits the module model says TDH.MNG.INIT clears or overrides for this request."""
    pred = ctx.predict_detail(req)
    if pred is None:
        return {}
    return {BitRef(c.leaf, c.subleaf, c.register, b): f"{c.kind}: {c.reason}"
            for c in pred.changes if c.kind in ("cleared", "overridden")
            for b in bits_of(c.mask)}


@check("effective_requested_bits_present", GROUP,
       "every reported feature bit the every-reported-bit request sets is in the TD's CPUID, "
       "unless the TDX module's rules clear it (XFAM, attributes, a bit the CPU lacks)")
def effective_requested_bits_present(ctx: Context) -> Verdict:
    req = ctx.full_request()
    _, read = ctx.td_cpuid(req)
    got = cpuid_of(read)
    absent = _absent(ctx, req, got)
    explained = _cleared_by_module(ctx, req)
    unexplained = [b for b in absent if b not in explained]
    if absent and ctx.model() is None:
        return skip(f"{labels(absent)} requested but absent: only a module profile says "
                    f"whether the module's rules clear them ({ctx.needs_module})")
    if unexplained:
        return bad(f"requested and reported, yet not in the TD's CPUID: {labels(unexplained)}",
                   "every requested bit present or cleared by the module's rules",
                   f"{len(unexplained)} bits absent", tuple(unexplained), request=req)
    note = f"; {len(absent)} cleared by the module's rules ({labels(absent)})" if absent else ""
    return ok(f"every requested reported bit is in the TD's CPUID{note}")


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
    """Bits KVM hides that the TD's CPUID has (feature registers only)."""
    hidden = hidden_masks(ctx)
    out = []
    for row in ctx.caps.entries:
        sub = ctx.subleaf_of(row.function, row.index)
        have = entry_regs(got, row.function, sub)
        if have is None:
            continue
        if hidden is not None:
            masks = list(hidden.get((row.function, row.index), (0, 0, 0, 0)))
        else:
            asked = mirror.find(req.init_vm.entries, row.function, row.index)
            sent = asked.regs() if asked is not None else (0, 0, 0, 0)
            masks = [s & ~r for s, r in zip(sent, row.regs(), strict=True)]
        for r, h, mask in zip(REGISTERS, have, masks, strict=True):
            if not value_register(row.function, sub, r):
                out += [BitRef(row.function, sub, r, b) for b in bits_of(h & mask)]
    return out


def _requests_to_read(ctx: Context) -> list[Request]:
    """Every request the suite saw ACCEPTED, plus the lookup traps (ACCEPTED where the
    kernel has the hole), so the group run alone still asks them."""
    traps = [ctx.trap(Trap.STEER, ebx=0, ecx=LEAF7_ECX_WAITPKG),
             ctx.trap(Trap.STEER, ebx=LEAF7_EBX_HLE | LEAF7_EBX_RTM, ecx=0),
             ctx.trap(Trap.STRAY, ebx=0, ecx=LEAF7_ECX_WAITPKG)]
    return list(dict.fromkeys([*ctx.accepted, *traps]))


@check("effective_no_hidden_bits", GROUP,
       "no bit KVM hides (listed by the module, never reported) is in the TD's CPUID after "
       "any request the suite saw ACCEPTED, the lookup traps included")
def effective_no_hidden_bits(ctx: Context) -> Verdict:
    read_tds = 0
    leaks: list[tuple[Request, list[BitRef]]] = []
    for req in _requests_to_read(ctx):
        outcome, read = ctx.td_cpuid(req)
        if outcome.kind is not Kind.ACCEPTED:
            continue
        got = cpuid_of(read)
        read_tds += 1
        bits = leaked(ctx, req, got)
        if bits:
            leaks.append((req, bits))
    if not read_tds:
        return skip("no request was ACCEPTED to read a TD's CPUID after")
    if not leaks:
        return ok(f"no hidden bit in the CPUID of {read_tds} TDs (every ACCEPTED request)")
    first, bits = leaks[0]
    every = list(dict.fromkeys(b for _, found in leaks for b in found))
    more = f"; {len(leaks) - 1} more ACCEPTED requests leak {labels(every)}" \
        if len(leaks) > 1 else ""
    return bad(f"{labels(bits)} set in the TD's CPUID (KVM_TDX_GET_CPUID), though KVM never "
               f"reported it: the hidden bit reaches the guest{more}",
               "no hidden bit in the TD's CPUID", f"{labels(every)} in the TD's CPUID",
               tuple(every), request=first)

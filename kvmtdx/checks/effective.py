"""effective: what the TD really gets, read back through a vCPU (KVM_TDX_GET_CPUID).

INIT_VM's return code is not the whole truth: the TDX module clears configured bits
silently and forces others, and a kernel bug can let a hidden bit through with a plain 0.
After an accepted INIT_VM a VMM splits the irqchip, creates a vCPU and reads the TD's CPUID
from the module (Linux 6.16+; arch/x86/kvm/vmx/tdx.c tdx_vcpu_get_cpuid).  These checks do
the same: the vCPU path's own rules (tdx_vcpu_create, tdx_vcpu_init, E2BIG), the TD's CPUID
against the mirror's (kvmtdx.model.get_cpuid), every requested bit present unless the
module's rules clear it, and no bit KVM hides in the TD after ANY request the suite saw
ACCEPTED.  A backend without vCPU ioctls (the kernel-source host answers ENOTTY) skips them.

set_cpuid2_consistency asks the series' open question: Linux 7.3 does not hold
KVM_SET_CPUID2 on a TD vCPU to the TD's CPUID (kvm_set_cpuid has no TD path), so KVM's own
view of the guest (its MSR and CPUID-exit emulation) can claim what the TD lacks.  It
records what the kernel does with a CPUID claiming a hidden bit, another bit the TD lacks,
and one leaving out a bit the TD has: `info` under the current policies, judged with
--strict, for a kernel that claims to validate.
"""

from __future__ import annotations

import errno

from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import Skip, Verdict, bad, check, info, labels, ok, skip
from kvmtdx.checks.td_cpuid import (
    OPEN,
    absent,
    cleared_by_module,
    cpuid_of,
    errno_of,
    leaked,
    lies,
    mismatches,
    requests_to_read,
    try_lie,
)
from kvmtdx.device import TdxVm, Vcpu
from kvmtdx.model import mirror
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.get_cpuid import predicted, unknown_bits
from kvmtdx.model.requests import Request
from kvmtdx.model.vcpu import (
    create_vcpu_errno,
    get_cpuid_answer,
    set_cpuid2_errno,
    split_irqchip_errno,
    without_dynamic_xsave,
)
from kvmtdx.outcome import Kind
from kvmtdx.status import errno_name

GROUP = "effective"


# ---------------------------------------------------------------------------
# The vCPU path's own rules.


def _vcpu_steps(ctx: Context, td: TdxVm) -> list[tuple[str, str, str]]:
    """(step, expected, got) of creating a vCPU on one TD, up to splitting the irqchip."""
    def create() -> None:
        td.create_vcpu(0).close()

    steps = [("KVM_CREATE_VCPU before INIT_VM",
              errno_name(create_vcpu_errno(dead=False, initialized=False, split=False)),
              errno_name(errno_of(create)))]
    if ctx.send(td, ctx.base()).kind is not Kind.ACCEPTED:
        raise Skip("the minimal request was not ACCEPTED (init_vm_minimal_accepted judges that)")
    steps.append(("KVM_CREATE_VCPU without a split irqchip",
                  errno_name(create_vcpu_errno(dead=False, initialized=True, split=False)),
                  errno_name(errno_of(create))))
    steps.append(("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)",
                  errno_name(split_irqchip_errno(dead=False)),
                  errno_name(errno_of(td.enable_split_irqchip))))
    return steps


def _init_vcpu_steps(vcpu: Vcpu) -> list[tuple[str, str, str]]:
    theirs = vcpu.tdx_get_cpuid()
    no_cpuid = vcpu.tdx_init_vcpu().errno
    told = without_dynamic_xsave(theirs)
    set_err = vcpu.set_cpuid2(told)
    first, again = vcpu.tdx_init_vcpu().errno, vcpu.tdx_init_vcpu().errno
    return [("KVM_TDX_INIT_VCPU before KVM_SET_CPUID2 (no x2APIC)", "EINVAL",
             errno_name(no_cpuid)),
            ("KVM_SET_CPUID2 with the TD's CPUID", errno_name(set_cpuid2_errno(told)),
             errno_name(set_err)),
            ("KVM_TDX_INIT_VCPU", "success", errno_name(first)),
            ("KVM_TDX_INIT_VCPU again", "EINVAL", errno_name(again))]


@check("effective_vcpu_lifecycle", GROUP,
       "a TD vCPU needs an initialised TD (EIO) and a split irqchip (EINVAL); "
       "KVM_TDX_INIT_VCPU needs x2APIC in the CPUID KVM_SET_CPUID2 gave, once per vCPU")
def effective_vcpu_lifecycle(ctx: Context) -> Verdict:
    created = errno_name(create_vcpu_errno(dead=False, initialized=True, split=True))
    with ctx.td() as td:
        steps = _vcpu_steps(ctx, td)
        try:
            with td.create_vcpu(0) as vcpu:
                steps.append(("KVM_CREATE_VCPU", created, "success"))
                steps += _init_vcpu_steps(vcpu)
        except OSError as e:
            steps.append(("KVM_CREATE_VCPU", created, errno_name(e.errno or errno.EIO)))
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
        entries = cpuid_of(td.read_cpuid())
        count = len(entries)
        with td.create_vcpu(1) as vcpu:
            fill = (count - 1).to_bytes(4, "little") + b"\x5a" * 4 + b"\xa5" * 40 * (count - 1)
            short = vcpu.tdx_get_cpuid_raw(0, fill=fill)
            hw = vcpu.tdx_get_cpuid_raw(count, hw_error=1)

    def said(err: int, data: bytes) -> str:
        return (f"{errno_name(err)}, nent {int.from_bytes(data[:4], 'little')}, padding and "
                f"entries {'untouched' if data[4:] == fill[4:] else 'written'}")
    want = f"{said(*get_cpuid_answer(entries, fill))}; hw_error: EINVAL"
    got = f"{said(short.errno, short.data)}; hw_error: {errno_name(hw.errno)}"
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
    if not ctx.know.host_exact:
        return skip("needs the host's whole CPUID (--host FILE|native): a host inferred from "
                    "the capabilities knows only the bits a VMM may configure, not the ones "
                    "the TD takes from the CPU")
    req = ctx.full_request()
    pred = mirror.init_vm_prediction(*m, req)
    want = predicted(m[0].tables, pred)
    if want is None:
        return skip(f"the mirror does not foresee a readable TD ({pred.outcome.describe()})")
    _, read = ctx.td_cpuid(req)
    got = cpuid_of(read)
    diffs = mismatches(got, want, unknown_bits(m[0]))
    summary = f"{len(want)} entries from leaf 0 to 0x{want[-1].function:x}"
    if diffs:
        return bad(f"the TD's CPUID is not the mirror's: {'; '.join(diffs[:6])}"
                   + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""),
                   summary, f"{len(got)} entries, {len(diffs)} differing", request=req)
    return ok(f"the TD's CPUID is the mirror's: {summary}", summary, summary)


@check("effective_requested_bits_present", GROUP,
       "every reported feature bit the every-reported-bit request sets is in the TD's CPUID, "
       "unless the TDX module's rules clear it (XFAM, attributes, a bit the CPU lacks)")
def effective_requested_bits_present(ctx: Context) -> Verdict:
    req = ctx.full_request()
    _, read = ctx.td_cpuid(req)
    got = cpuid_of(read)
    missing = absent(ctx, req, got)
    explained = cleared_by_module(ctx, req)
    unexplained = [b for b in missing if b not in explained]
    if missing and ctx.model() is None:
        return skip(f"{labels(missing)} requested but absent: only a module profile says "
                    f"whether the module's rules clear them ({ctx.needs_module})")
    if unexplained:
        return bad(f"requested and reported, yet not in the TD's CPUID: {labels(unexplained)}",
                   "every requested bit present or cleared by the module's rules",
                   f"{len(unexplained)} bits absent", tuple(unexplained), request=req)
    note = f"; {len(missing)} cleared by the module's rules ({labels(missing)})" if missing else ""
    return ok(f"every requested reported bit is in the TD's CPUID{note}")


@check("effective_no_hidden_bits", GROUP,
       "no bit KVM hides (listed by the module, never reported) is in the TD's CPUID after "
       "any request the suite saw ACCEPTED, the lookup traps included")
def effective_no_hidden_bits(ctx: Context) -> Verdict:
    read_tds = 0
    leaks: list[tuple[Request, list[BitRef]]] = []
    for req in requests_to_read(ctx):
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
    others = len(leaks) - 1
    more = (f"; {others} more ACCEPTED request{'s' if others > 1 else ''} leak"
            f"{'' if others > 1 else 's'} too (in all: {labels(every)})") if others else ""
    return bad(f"{labels(bits)} set in the TD's CPUID (KVM_TDX_GET_CPUID), though KVM never "
               f"reported it: the hidden bit reaches the guest{more}",
               "no hidden bit in the TD's CPUID", f"{labels(every)} in the TD's CPUID",
               tuple(every), request=first)


@check("set_cpuid2_consistency", GROUP,
       "on a vCPU of an initialised TD, KVM_SET_CPUID2 with a CPUID that differs from "
       "KVM_TDX_GET_CPUID (a hidden bit, a bit the TD lacks, a bit it has left out): what KVM "
       "does is recorded (info); --strict fails a kernel that accepts it")
def set_cpuid2_consistency(ctx: Context) -> Verdict:
    with ctx.td() as td:
        if ctx.send(td, ctx.full_request()).kind is not Kind.ACCEPTED:
            return skip("the every-reported-bit request was not ACCEPTED")
        theirs = cpuid_of(td.read_cpuid())
        base = without_dynamic_xsave(theirs)
        with td.create_vcpu(1) as vcpu:
            err = vcpu.set_cpuid2(base)
            if err:
                return bad(f"KVM_SET_CPUID2 refused the TD's own CPUID ({errno_name(err)}), "
                           "which a VMM hands it after KVM_TDX_GET_CPUID",
                           "success", errno_name(err))
            answers = [(lie, try_lie(vcpu, base, lie)) for lie in lies(ctx, theirs)]
    said = "; ".join(f"{lie.what}, {lie.bit.label()}: {a}" for lie, a in answers)
    taken = [lie for lie, a in answers if a.startswith("accepted")]
    bits = tuple(lie.bit for lie in taken)
    expected = "refused (--strict)" if ctx.strict else "not judged: the series leaves it open"
    actual = f"{len(taken)} of {len(answers)} accepted"
    if taken:
        detail = f"KVM_SET_CPUID2 accepted {len(taken)} of {len(answers)} CPUIDs unlike the " \
                 f"TD's ({said}): {OPEN}"
        return bad(detail, expected, actual, bits) if ctx.strict else \
            info(detail, expected, actual, bits)
    detail = f"KVM_SET_CPUID2 refused every CPUID unlike the TD's ({said}): it validates"
    return ok(detail, expected, actual) if ctx.strict else info(detail, expected, actual)

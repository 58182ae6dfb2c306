"""effective: the series' open question, KVM_SET_CPUID2 on a TD vCPU against the TD's CPUID.

A TD's CPUID is fixed by KVM_TDX_INIT_VM and held by the TDX module; KVM keeps its own view
of the guest, set by KVM_SET_CPUID2, for its MSR and CPUID-exit emulation.  VMMs (QEMU)
read the TD's with KVM_TDX_GET_CPUID and hand it to KVM_SET_CPUID2.  Linux 7.3 does not
hold KVM_SET_CPUID2 to it (kvm_set_cpuid has no TD path), and the allowlist series' cover
letter leaves that "Open".  This check records what the kernel does with a CPUID that
claims a hidden bit the TD lacks, another bit the TD lacks, and one without a bit the TD
has: `info` under the current policies, a failure with --strict for a kernel that claims
to validate.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.checks.context import Context
from kvmtdx.checks.effective import GROUP, cpuid_of, hidden_masks, quirk_free
from kvmtdx.checks.registry import Verdict, bad, check, info, ok, skip
from kvmtdx.device import Vcpu
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.get_cpuid import entry_regs
from kvmtdx.model.rules import LEAF7_ECX_WAITPKG, bits_of, is_value_register, lowest_bit
from kvmtdx.outcome import Kind
from kvmtdx.status import errno_name
from kvmtdx.structs import REGISTERS, CpuidEntry

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


def _lies(ctx: Context, theirs: tuple[CpuidEntry, ...]) -> list[Lie]:
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


def _told(entries: tuple[CpuidEntry, ...], lie: Lie) -> tuple[CpuidEntry, ...]:
    """The TD's CPUID with the lie in it."""
    b = lie.bit
    mask = 1 << b.bit
    return tuple(e.with_reg(b.register, e.reg(b.register) | mask if lie.on
                            else e.reg(b.register) & ~mask)
                 if e.function == b.leaf and (b.subleaf is None or e.index == b.subleaf)
                 else e for e in entries)


def _try(vcpu: Vcpu, base: tuple[CpuidEntry, ...], lie: Lie) -> str:
    """What KVM did with the lie: refused (its errno), or took it into its own view."""
    err = vcpu.set_cpuid2(_told(base, lie))
    if err:
        return f"refused ({errno_name(err)})"
    view = _regs(vcpu.get_cpuid2(), lie.bit.leaf, lie.bit.subleaf)
    kept = view[REGISTERS.index(lie.bit.register)] >> lie.bit.bit & 1
    return "accepted" + (", KVM_GET_CPUID2 shows it" if kept == lie.on else "")


@check("set_cpuid2_consistency", GROUP,
       "on a vCPU of an initialised TD, KVM_SET_CPUID2 with a CPUID that differs from "
       "KVM_TDX_GET_CPUID (a hidden bit, a bit the TD lacks, a bit it has left out): what KVM "
       "does is recorded (info); --strict fails a kernel that accepts it")
def set_cpuid2_consistency(ctx: Context) -> Verdict:
    with ctx.td() as td:
        if ctx.send(td, ctx.full_request()).kind is not Kind.ACCEPTED:
            return skip("the every-reported-bit request was not ACCEPTED")
        theirs = cpuid_of(td.read_cpuid())
        base = quirk_free(theirs)
        with td.create_vcpu(1) as vcpu:
            err = vcpu.set_cpuid2(base)
            if err:
                return bad(f"KVM_SET_CPUID2 refused the TD's own CPUID ({errno_name(err)}), "
                           "which a VMM hands it after KVM_TDX_GET_CPUID",
                           "success", errno_name(err))
            lies = _lies(ctx, theirs)
            answers = [(lie, _try(vcpu, base, lie)) for lie in lies]
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

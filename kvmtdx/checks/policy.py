"""policy: what the kernel's policy says it reports.

A rule runs when the policy has what the rule is about (a denylist, an allowlist), never
because of the policy's name, so a user's allowlist or a new kernel's policy is judged by
the same checks.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import (
    NEEDS_POLICY,
    Verdict,
    bad,
    check,
    labels,
    need,
    ok,
    skip,
)
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.policy import Allowlist, Policy
from kvmtdx.model.profiles import ModuleProfile, Regs, enumerated
from kvmtdx.model.rules import (
    GPAW_FIELD,
    GPAW_LEAF,
    LEAF7_EDX_CORE_CAPABILITIES,
    bits_of,
    gpaw_of,
    is_value_register,
    lowest_bit,
)
from kvmtdx.structs import REGISTERS

GROUP = "policy"


def _policy(ctx: Context) -> Policy:
    return need(ctx.know.policy, NEEDS_POLICY)


def _allowlist(ctx: Context) -> Allowlist:
    p = _policy(ctx)
    return need(p.allowlist, f"{p.name} has no allowlist")


def _listed(ctx: Context) -> tuple[ModuleProfile, tuple[Regs, ...]]:
    """The module and what it lists on this host, row by row (mirror: enumerated)."""
    m, h = need(ctx.know.module, ctx.needs_module), need(ctx.know.host, ctx.needs_module)
    return m, enumerated(m, h)


@check("policy_gpaw_reported_ff", GROUP,
       "CPUID 0x80000008 EAX[23:16] is reported as 0xff (KVM's GPAW knob)")
def policy_gpaw_reported_ff(ctx: Context) -> Verdict:
    for e in ctx.caps.entries:
        if e.function == GPAW_LEAF:
            got = gpaw_of(e)
            if got == 0xFF:
                return ok("0xff")
            return bad(f"EAX[23:16] = 0x{got:02x}", "0xff", f"0x{got:02x}")
    return skip("no 0x80000008 row listed")


def _reported_within(ctx: Context, mask: Callable[[int, int, str], int]) -> list[BitRef]:
    """The reported bits inside `mask(leaf, index, register)`, named."""
    return [ctx.ref(e.function, e.index, r, b) for e in ctx.caps.entries for r in REGISTERS
            for b in bits_of(e.reg(r) & mask(e.function, e.index, r))]


@check("policy_denylist_hidden", GROUP,
       "a denylist (upstream: HLE, RTM in 7.0 EBX, WAITPKG in 7.0 ECX): its bits are never "
       "reported")
def policy_denylist_hidden(ctx: Context) -> Verdict:
    p = _policy(ctx)
    deny = need(p.denylist, f"{p.name} has no denylist")
    listed = {(e.function, e.index) for e in ctx.caps.entries}
    if not listed & set(deny.bits):
        return skip("no row of the denylist listed")
    shown = _reported_within(ctx, deny.mask)
    if shown:
        return bad(f"reported: {labels(shown)}", "hidden", "reported", tuple(shown))
    names = [ctx.ref(leaf, index, r, b).name for (leaf, index), regs in deny.bits.items()
             for r in REGISTERS for b in bits_of(regs.get(r, 0))]
    return ok(f"{', '.join(names)} hidden")


def _outside(allow: Allowlist, leaf: int, index: int, register: str) -> int:
    outside = ~allow.mask(leaf, index, register)
    return outside & ~GPAW_FIELD if (leaf, register) == (GPAW_LEAF, "eax") else outside


@check("policy_allowlist_filter", GROUP,
       "an allowlist (rfc-v2): every reported feature bit is inside it")
def policy_allowlist_filter(ctx: Context) -> Verdict:
    allow = _allowlist(ctx)
    out = _reported_within(ctx, lambda leaf, index, r: _outside(allow, leaf, index, r))
    if out:
        return bad(f"reported outside the allowlist ({allow.name}): {labels(out)}",
                   "inside the allowlist", "outside", tuple(out))
    return ok(f"every reported bit inside {allow.name}")


@check("policy_value_registers_unfiltered", GROUP,
       "an allowlist (rfc-v2) leaves value registers (1 EAX/EBX, 4, 0x18, 0x1F, 0x80000008 "
       "EAX) as the module lists them")
def policy_value_registers_unfiltered(ctx: Context) -> Verdict:
    _allowlist(ctx)
    module, listed_rows = _listed(ctx)
    changed: list[BitRef] = []
    for row, listed, e in zip(module.rows, listed_rows, ctx.caps.entries, strict=False):
        for r, want, have in zip(REGISTERS, listed, e.regs(), strict=True):
            if not is_value_register(row.leaf, row.subleaf, r):
                continue
            if row.leaf == GPAW_LEAF and r == "eax":
                want |= GPAW_FIELD
            changed += [BitRef(row.leaf, row.subleaf, r, b) for b in bits_of(want ^ have)]
    if changed:
        return bad(f"value register bits filtered or changed: {labels(changed)}",
                   "as the module lists", "changed", tuple(changed))
    return ok("value registers unfiltered")


@check("policy_core_capabilities_reported", GROUP,
       "an allowlist (rfc-v2) that allows CORE_CAPABILITIES (7.0 EDX bit 30): it is reported "
       "where the module allows it")
def policy_core_capabilities_reported(ctx: Context) -> Verdict:
    allow = _allowlist(ctx)
    module, listed_rows = _listed(ctx)
    core = LEAF7_EDX_CORE_CAPABILITIES
    i = module.row_index(7, 0)
    e = ctx.leaf7()
    if i is None or e is None:
        return skip("no leaf 7.0 row")
    listed = listed_rows[i][3] & core
    want = bool(listed and allow.mask(7, 0, "edx") & core)
    got_it = bool(e.edx & core)
    ref = (BitRef(7, 0, "edx", lowest_bit(core)),)
    if want == got_it:
        return ok(("reported" if got_it else "hidden (module or allowlist lacks it)"), bits=ref)
    return bad(f"{ref[0].label()} {'reported' if got_it else 'hidden'}",
               "reported" if want else "hidden", "reported" if got_it else "hidden", ref)

"""adversarial: spec section 4's traps of KVM's CPUID lookup.

Each trap carries leaf-7.0 bits this kernel hides (and the module would take) into row 7.0
by way of find() rather than by the entry's own index (kvmtdx.model.builders.Trap).  A
hidden bit the module would take must come back KVM_REJECTED (spec section 5): ACCEPTED
breaks the invariant, MODULE_REJECTED means KVM let it through.
"""

from __future__ import annotations

from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import (
    Verdict,
    bad,
    check,
    describe,
    labels,
    ok,
    predicted_bit,
    skip,
)
from kvmtdx.checks.sweep import Sweep
from kvmtdx.model import builders, invariant
from kvmtdx.model.builders import Trap
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.profiles import enumerated
from kvmtdx.model.rules import (
    LEAF7_EBX_HLE,
    LEAF7_EBX_RTM,
    LEAF7_ECX_WAITPKG,
    bits_of,
    is_value_register,
)
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.structs import REGISTERS
from kvmtdx.verdict import Status

GROUP = "adversarial"
WHERE = "(KVM matched the row by its CPUID lookup, not by the entry's own index)"


def _hidden_bits(ctx: Context, ebx: int, ecx: int) -> tuple[BitRef, ...] | str:
    """The leaf 7.0 bits a trap smuggles, if KVM hides them and the module would take them;
    else why there is nothing to smuggle."""
    e = ctx.leaf7()
    if e is None:
        return "no leaf 7.0 row listed"
    refs = [BitRef(7, 0, "ebx", b) for b in bits_of(ebx)]
    refs += [BitRef(7, 0, "ecx", b) for b in bits_of(ecx)]
    if e.ebx & ebx or e.ecx & ecx:
        return f"{labels(refs)} reported by this kernel: nothing to smuggle"
    k = ctx.know
    if k.module is not None and k.host is not None:
        i = k.module.row_index(7, 0)
        if i is None:
            return "the module lists no leaf 7.0 row"
        unknown = k.module.unknown_mask(i)
        if unknown[1] & ebx or unknown[2] & ecx:
            return (f"{labels(refs)} unknown to the module profile (saved under a policy "
                    "that hides them)")
        listed = enumerated(k.module, k.host)[i]
        if listed[1] & ebx != ebx or listed[2] & ecx != ecx:
            return f"the module would not take {labels(refs)} on this host: nothing hidden"
    return tuple(refs)


def _past_kvm(judged: invariant.InvariantJudgement, actual: Outcome) -> str:
    if not judged.kept:
        return "ACCEPTED: the hidden bits reach the TD"
    if actual.kind == Kind.MODULE_REJECTED:
        return ("MODULE_REJECTED: KVM let the hidden bits through to the module, which "
                "refused them")
    return f"{describe(actual)}: past KVM's check"


def _smuggle(ctx: Context, trap: Trap, ebx: int, ecx: int, what: str) -> Verdict:
    hidden = _hidden_bits(ctx, ebx, ecx)
    if isinstance(hidden, str):
        return skip(hidden)
    req = ctx.trap(trap, ebx=ebx, ecx=ecx)
    actual = ctx.attempt(req)
    ctx.trap_log.append((f"{trap}: {what}", req, actual))
    if actual.kind == Kind.KVM_REJECTED:
        return ok(f"{what}: KVM refused it ({describe(actual)})", "KVM_REJECTED",
                  describe(actual), hidden)
    judged = invariant.judge(ctx.caps.entries, req, actual, module=ctx.know.module,
                           host=ctx.know.host)
    return bad(f"{what}: {labels(list(hidden))} never reported, yet "
               f"{_past_kvm(judged, actual)} {WHERE}", "KVM_REJECTED", describe(actual),
               hidden, request=req)


def _trap_check(id_: str, about: str, trap: Trap, ebx: int, ecx: int, what: str) -> None:
    """Register a check that sends one trap request smuggling `ebx`/`ecx` into row 7.0."""
    check(id_, GROUP, about)(lambda ctx: _smuggle(ctx, trap, ebx, ecx, what))


WAITPKG, HLE_RTM = LEAF7_ECX_WAITPKG, LEAF7_EBX_HLE | LEAF7_EBX_RTM
_trap_check("adversarial_denylist_bypass_waitpkg",
            "flagged 7.1/7.2 entries first, then an unflagged leaf-7 entry (index 5) carrying "
            "WAITPKG: KVM must refuse it", Trap.STEER, 0, WAITPKG, "WAITPKG steered to row 7.0")
_trap_check("adversarial_denylist_bypass_hle_rtm",
            "the same steering with HLE+RTM: KVM must refuse it",
            Trap.STEER, HLE_RTM, 0, "HLE+RTM steered to row 7.0")
_trap_check("adversarial_denylist_bypass_stray_balance",
            "an unflagged leaf-7 entry (index 5) carrying WAITPKG, counted once per leaf-7 row, "
            "with stray entries making the count balance: KVM must refuse it",
            Trap.STRAY, 0, WAITPKG, "WAITPKG with stray entries balancing the count")
_trap_check("adversarial_unflagged_multi_match",
            "an unflagged leaf-7 entry carrying WAITPKG matches several rows: KVM must refuse "
            "it", Trap.MULTI, 0, WAITPKG, "unflagged WAITPKG entry alone")


@check("adversarial_duplicate_entries", GROUP,
       "two 7.0 entries, WAITPKG in the first or the second: KVM must refuse both")
def adversarial_duplicate_entries(ctx: Context) -> Verdict:
    a = _smuggle(ctx, Trap.DUP_FIRST, 0, WAITPKG, "duplicate 7.0, WAITPKG first")
    if a.status is not Status.PASS:
        return a
    b = _smuggle(ctx, Trap.DUP_SECOND, 0, WAITPKG, "duplicate 7.0, WAITPKG second")
    if b.status is not Status.PASS:
        return b
    return ok(f"{a.detail}; {b.detail}", a.expected, a.actual, a.bits)


TRAP_CHECKS = ("adversarial_denylist_bypass_waitpkg", "adversarial_denylist_bypass_hle_rtm",
               "adversarial_denylist_bypass_stray_balance", "adversarial_unflagged_multi_match",
               "adversarial_duplicate_entries")


@check("adversarial_matches_prediction", GROUP,
       "every trap request above gets exactly the mirror's answer for this policy, or KVM's "
       "refusal where the mirror reproduces the policy's known hole", needs=TRAP_CHECKS)
def adversarial_matches_prediction(ctx: Context) -> Verdict:
    if not ctx.exact:
        return skip(ctx.needs_module)
    if not ctx.trap_log:
        return skip("no trap request was sent")
    stricter = 0
    for what, req, actual in ctx.trap_log:
        pred = ctx.predict(req)
        if pred is None:
            return skip(ctx.needs_module)
        agreement = ctx.agreement(req, pred, actual)
        if agreement is invariant.Agreement.DIFFERS:
            return bad(f"{what}: {describe(actual)}, expected {describe(pred)}",
                       pred.describe(), describe(actual), predicted_bit(pred), request=req)
        stricter += agreement is invariant.Agreement.STRICTER
    n = len(ctx.trap_log)
    if stricter:
        return ok(f"{n} trap requests: {n - stricter} as predicted, {stricter} refused where "
                  f"{invariant.STRICTER_NOTE}")
    return ok(f"{n} trap requests as predicted")


# ---------------------------------------------------------------------------
# Every row of a leaf with several sub-leaf rows, reached through find() (not only 7.0).


def _steerable_rows(ctx: Context) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """(leaf, index, the full request's registers for that row) for every reported row of a
    leaf reported with several rows."""
    full = {(e.function, e.index): e for e in ctx.full_request().init_vm.entries}
    out = []
    for leaf, indexes in builders.multi_row_leaves(ctx.caps.entries).items():
        for i in indexes:
            e = full.get((leaf, i))
            out.append((leaf, i, e.regs() if e is not None else (0, 0, 0, 0)))
    return out


@check("adversarial_steer_legal_accepted", GROUP,
       "the twin of the traps: each row of a leaf with several sub-leaf rows, its reported "
       "bits carried by an unflagged entry at an unlisted index that find() lands on that row "
       "(flagged entries for the leaf's other rows first), is ACCEPTED")
def adversarial_steer_legal_accepted(ctx: Context) -> Verdict:
    t = Sweep("rows reached by a steered entry")
    full = ctx.full_request()
    for leaf, i, regs in _steerable_rows(ctx):
        req = builders.steered(full, ctx.caps.entries, leaf, i, regs)
        t.send(ctx, f"row 0x{leaf:x}.{i}", req, Kind.ACCEPTED)
    return t.verdict()


# The bits the denylist traps above already steer into row 7.0.
_TRAPPED = {(7, 0, "ebx"): HLE_RTM, (7, 0, "ecx"): WAITPKG}


def _hidden_in_row(ctx: Context, leaf: int, index: int) -> list[tuple[str, int]]:
    """(register, bit) of every feature bit the module lists for the row (it would take it)
    that KVM did not report, the profile knows, and no trap above already steers."""
    k = ctx.know
    assert k.module is not None and k.host is not None
    reported = next((e for e in ctx.caps.entries if (e.function, e.index) == (leaf, index)),
                    None)
    row = None if reported is None else ctx.row_of(reported)
    if row is None or reported is None:
        return []
    listed, unknown = enumerated(k.module, k.host)[row], k.module.unknown_mask(row)
    out = []
    for j, r in enumerate(REGISTERS):
        if is_value_register(leaf, index, r):
            continue
        hidden = listed[j] & ~reported.reg(r) & ~unknown[j] & ~_TRAPPED.get((leaf, index, r), 0)
        out += [(r, b) for b in bits_of(hidden)]
    return out


@check("adversarial_steer_every_row", GROUP,
       "each bit KVM hides (and the module would take) in any row of a leaf with several "
       "sub-leaf rows, carried alone by an unflagged entry that find() lands on that row: "
       "KVM must refuse it")
def adversarial_steer_every_row(ctx: Context) -> Verdict:
    if ctx.know.module is None or ctx.know.host is None:
        return skip(ctx.needs_module)
    t = Sweep("hidden bits steered onto their rows")
    full = ctx.full_request()
    for leaf, i, regs in _steerable_rows(ctx):
        for r, b in _hidden_in_row(ctx, leaf, i):
            carried = list(regs)
            carried[REGISTERS.index(r)] |= 1 << b
            req = builders.steered(full, ctx.caps.entries, leaf, i, carried)
            ref = ctx.ref(leaf, i, r, b)
            t.send(ctx, ref.label(), req, Kind.KVM_REJECTED, bits=(ref,))
    if not t.tried:
        return skip("no row of a multi-row leaf hides a bit the module would take, beyond "
                    "those the denylist traps steer")
    return t.verdict()

"""init_vm_content: spec section 5's invariant on the CPUID bits themselves.

Every reported feature bit together is ACCEPTED; every feature bit of a listed row that was
not reported, alone on its own TD, is not (kvmtdx.model.invariant), and is refused by KVM
or the module exactly as the mirror predicts when the module is known.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import (
    Verdict,
    bad,
    check,
    describe,
    judge,
    labels,
    ok,
    predicted_bit,
    skip,
)
from kvmtdx.model import builders, invariant
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import bits_of, is_value_register
from kvmtdx.outcome import Kind
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry

GROUP = "init_vm_content"
REFUSED = "KVM_REJECTED or MODULE_REJECTED"


@check("init_vm_all_reported_accepted", GROUP,
       "one TD with every reported feature bit (couplings met) is ACCEPTED")
def init_vm_all_reported_accepted(ctx: Context) -> Verdict:
    req = ctx.full_request()
    outside = [ctx.ref(*key) for key in
               invariant.outside_reported(ctx.caps.entries, req.init_vm.entries)]
    if outside:
        # The prediction is built from the mirror's capabilities; a kernel that
        # reports less makes this request carry unreported bits.
        return skip(f"the request would carry unreported bits ({labels(outside)}); "
                    "caps_entries_match_prediction reports the difference")
    actual = ctx.attempt(req)
    bits = sum(bin(v).count("1") for e in req.init_vm.entries for v in e.regs())
    if actual.kind == Kind.ACCEPTED:
        return ok(f"{len(req.init_vm.entries)} entries, {bits} bits set: ACCEPTED",
                  "ACCEPTED", describe(actual))
    pred = ctx.predict(req)
    why = f" (mirror: {pred.describe()})" if pred is not None else ""
    return bad(f"every reported bit together: {describe(actual)}{why}", "ACCEPTED",
               describe(actual), predicted_bit(pred), request=req)


@dataclass
class _BitTally:
    tested: int = 0
    exempt: int = 0
    unknown: int = 0
    stricter: int = 0  # refused by KVM where the mirror reproduces the policy's known hole
    fails: list[tuple[BitRef, str, str]] = field(default_factory=list)  # bit, expected, actual
    first_request: Request | None = None  # the request of the first failing bit

    def fail(self, ref: BitRef, expected: str, actual: str, req: Request) -> None:
        self.fails.append((ref, expected, actual))
        if self.first_request is None:
            self.first_request = req

    def notes(self, module_known: bool) -> str:
        notes = []
        if self.exempt:
            notes.append(f"{self.exempt} silently cleared by the module (host lacks them)")
        if self.unknown:
            notes.append(f"{self.unknown} unknown to the profile, skipped")
        if self.stricter:
            notes.append(f"{self.stricter} refused by KVM where the model predicts the "
                         "policy's known hole: stricter than the model")
        if not module_known:
            notes.append("no profile: invariant only")
        return f" ({'; '.join(notes)})" if notes else ""


def _unreported_bits(ctx: Context) -> Iterator[tuple[CpuidEntry, int | None, str, int]]:
    """Each feature bit of each listed row that was not reported: entry, module row,
    register, bit."""
    for e in ctx.caps.entries:
        row = ctx.row_of(e)
        for r, value in zip(REGISTERS, e.regs(), strict=True):
            if is_value_register(e.function, e.index, r):
                continue
            for b in bits_of(~value & 0xFFFFFFFF):
                yield e, row, r, b


def _try_bit(ctx: Context, t: _BitTally, e: CpuidEntry, register: str, bit: int) -> None:
    """One unreported bit alone on a fresh TD, held to the invariant and the prediction."""
    ref = ctx.ref(e.function, e.index, register, bit)
    probe = CpuidEntry(e.function, e.index, FLAG_SIGNIFICANT_INDEX).with_reg(register, 1 << bit)
    req = ctx.base((probe,))
    actual = ctx.attempt(req)
    t.tested += 1
    pred = ctx.predict(req)
    judged = invariant.judge(ctx.caps.entries, req, actual, module=ctx.know.module,
                           host=ctx.know.host)
    if judged.exempt:
        t.exempt += 1
    elif not judged.kept:
        t.fail(ref, REFUSED, "ACCEPTED", req)
        return
    elif pred is None and actual.kind not in (Kind.KVM_REJECTED, Kind.MODULE_REJECTED):
        t.fail(ref, REFUSED, describe(actual), req)
        return
    if pred is None:
        return
    agreement = ctx.agreement(req, pred, actual)
    if agreement is invariant.Agreement.DIFFERS:
        t.fail(ref, pred.describe(), describe(actual), req)
    t.stricter += agreement is invariant.Agreement.STRICTER


def _tally_verdict(t: _BitTally, module_known: bool) -> Verdict:
    tail = t.notes(module_known)
    if not t.fails:
        if not t.tested:
            return skip("no unreported feature bit to test" + tail)
        return ok(f"{t.tested} bits, one TD each, refused as expected{tail}")
    refs = tuple(f[0] for f in t.fails)
    accepted = [f[0] for f in t.fails if f[2] == "ACCEPTED"]
    head = (f"{len(accepted)} unreported bits ACCEPTED: {labels(accepted)}" if accepted else
            f"{len(t.fails)} of {t.tested} bits answered otherwise: {labels(list(refs))}")
    first = t.fails[0]
    return bad(f"{head}{tail}", f"{first[0].label()}: {first[1]}",
               f"{first[0].label()}: {first[2]}", refs, request=t.first_request)


@check("init_vm_unreported_bits_refused", GROUP,
       "each feature bit of a listed row that was not reported, alone on its own TD, is "
       "not ACCEPTED, and is refused by KVM or the module as predicted")
def init_vm_unreported_bits_refused(ctx: Context) -> Verdict:
    m = ctx.know.module
    t = _BitTally()
    for e, row, r, b in _unreported_bits(ctx):
        if m is not None and row is not None and \
                m.unknown_mask(row)[REGISTERS.index(r)] >> b & 1:
            t.unknown += 1
            continue
        _try_bit(ctx, t, e, r, b)
    return _tally_verdict(t, m is not None)


# ---------------------------------------------------------------------------
# The first half of the invariant in encodings other than the plain one.


@check("init_vm_entry_order_accepted", GROUP,
       "every reported bit with the entries in reverse order is ACCEPTED (find() takes each "
       "row's entry wherever it is)")
def init_vm_entry_order_accepted(ctx: Context) -> Verdict:
    req = builders.reversed_order(ctx.full_request())
    return judge(ctx, req, ctx.attempt(req), Kind.ACCEPTED, "entries last to first")


@check("init_vm_value_registers_realistic_accepted", GROUP,
       "every reported bit with the value registers at realistic non-zero values inside what "
       "was reported (leaf 1 EAX the host's F/M/S, cache and TLB leaves, an SMT+core 0x1F "
       "topology, address widths) is ACCEPTED")
def init_vm_value_registers_realistic_accepted(ctx: Context) -> Verdict:
    req = builders.realistic_values(ctx.full_request(), ctx.caps.entries, fms=ctx.native_fms())
    actual = ctx.attempt(req)
    what = "realistic value registers"
    if ctx.know.host_exact:
        return judge(ctx, req, actual, Kind.ACCEPTED, what)
    # The host's F/M/S came from KVM_GET_SUPPORTED_CPUID, which the mirror does not know.
    if actual.kind == Kind.ACCEPTED:
        return ok(f"{what}: ACCEPTED", "ACCEPTED", describe(actual))
    return bad(f"{what}: {describe(actual)}, expected ACCEPTED", "ACCEPTED", describe(actual))

"""The classification: every bit KVM_TDX_CAPABILITIES lists, by real KVM_TDX_INIT_VM outcomes.

Each INIT_VM needs a fresh TD, and on real hardware a TD costs a TDX key ID,
pages and several SEAMCALLs, so the prober spends TDs carefully (Prober.run):

1. Plan: reported feature bits (and value-register fields, at valid values)
   become units; bits the module couples go in one unit (HLE with RTM:
   rules.MODULE_COUPLINGS), and every unit rides on XFAM = everything KVM
   supports.  Bits the module clears rather than refuses (a feature whose
   XSAVE state XFAM lacks, PKS set from ATTRIBUTES.PKS) are accepted, and the
   results say "accepted, cleared" with the module's reason.
2. The base: every unit in one request.  Spec section 5 says it must be
   ACCEPTED; when it is not, the rejected units are found by binary
   splitting.  Splitting is sound because a rejection has one cause: with
   the other units known good, a group is rejected exactly when one of its
   units is.
3. Lone units: a reported bit whose coupling cannot be met (its rejection is
   put down to that coupling), or that the mirror says the kernel should hide,
   is tried alone on top of what was accepted.
4. Hidden bits, one per TD on top of what was accepted: a rejected group of
   hidden bits says nothing about each member, and every hidden bit is
   expected to be rejected.  A hidden bit the module refused alone is tried
   again with its coupling partners: only if the module then takes it is it
   a hazard.
5. Explanations: a rejected reported bit or an accepted hidden one is a
   kernel bug unless a module rule (a coupling, TSX_CTRL, a bit the module
   drops silently) accounts for it; an accepted bit the TD does not get is
   named with what cleared it (the mirror's effective CPUID).

Value registers (leaf 1 EAX/EBX, leaves 4, 0x18, 0x1F, 0x80000008 EAX) hold
fields, not features: they are tried only with valid values and reported per
field (a contiguous run of reported bits).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import NamedTuple

from kvmtdx.errors import ProbeError
from kvmtdx.model import catalog, mirror, rules
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.outcome import Decider, Kind, Outcome
from kvmtdx.probe.oracle import Oracle, mirror_oracle
from kvmtdx.probe.result import BitClass, BitKey, BitResult, FieldClass, FieldResult
from kvmtdx.probe.units import (
    GPAW_5LEVEL,
    Bit,
    Layout,
    Model,
    Unit,
    ValueField,
    gpaw_5level,
    hidden_targets,
    read_layout,
    value_fields,
)
from kvmtdx.structs import Capabilities, InitVm


class Classed(NamedTuple):
    cls: BitClass
    outcome: Outcome | None  # None: inferred by splitting
    why: str | None  # the module rule that excuses a refusal, if one does


FieldTry = tuple[ValueField, FieldClass, Outcome | None]


@dataclass
class Classified:
    bits: dict[BitKey, Classed]
    fields: list[FieldTry]
    untested: int
    complete: bool
    notes: list[str]


@dataclass
class Plan:
    """The reported bits as units: the base group (feature units, then value fields), the
    units tried alone (with the coupling that excuses their refusal, if one does), and the
    bits each feature unit holds."""

    group: list[Unit] = field(default_factory=list)
    lone: list[tuple[Unit, str | None]] = field(default_factory=list)
    unit_bits: dict[Unit, list[BitKey]] = field(default_factory=dict)
    field_units: dict[ValueField, Unit] = field(default_factory=dict)

    def add(self, unit: Unit, keys: list[BitKey], *, lone: bool, why: str | None = None) -> None:
        self.unit_bits[unit] = keys
        if lone:
            self.lone.append((unit, why))
        else:
            self.group.append(unit)


class _Prober:
    def __init__(self, caps: Capabilities, oracle: Oracle, model: Model | None, *,
                 exhaustive: bool, native_fms: int | None) -> None:
        self.oracle = oracle
        self.model = model
        self.exhaustive = exhaustive
        self.layout = read_layout(caps, model)
        self.native_fms = native_fms
        self.xfam = caps.supported_xfam
        self.notes: list[str] = []
        self.bits: dict[BitKey, Classed] = {}
        self.fields: list[FieldTry] = []
        self.complete = True
        self.suspects = suspects(self.layout, model)

    def run(self) -> Classified:
        plan = self._plan()
        accepted, rejected = self._try_base(plan.group)
        self._try_lone(plan, accepted)
        self._record_base(plan, accepted, rejected)
        self._try_hidden(accepted)
        total = 32 * len(self.layout.feature_regs())
        return Classified(self.bits, self.fields, total - len(self.bits), self.complete,
                          self.notes)

    # -- asking ----------------------------------------------------------------

    def _ask(self, requests: list[InitVm]) -> list[Outcome | None]:
        outs = self.oracle(requests)
        if any(o is None for o in outs):
            self.complete = False
        return outs

    def _request(self, units: list[Unit]) -> InitVm:
        return self.layout.request(units, xfam=self.xfam)

    # -- 1. plan ---------------------------------------------------------------

    def _plan(self) -> Plan:
        lay = self.layout
        plan = Plan()
        fields, notes = value_fields(lay, self.native_fms)
        self.notes.extend(notes)
        coupled: dict[rules.Coupling, list[Bit]] = {}
        for b in lay.reported_bits():
            key = lay.key(*b)
            reason = lay.coupling_unmet(*b)
            c = lay.coupling(*b)
            if reason is not None:
                plan.add(lay.unit(*b), [key], lone=True, why=reason)
            elif c is not None:
                coupled.setdefault(c, []).append(b)
            else:
                plan.add(lay.unit(*b), [key], lone=key in self.suspects)
        for members in coupled.values():
            # Bits the module wants equal go in together, one unit.
            keys = [lay.key(*m) for m in members]
            unit = Unit(tuple((row, register, 1 << bit) for row, register, bit in members))
            plan.add(unit, keys, lone=bool(self.suspects & set(keys)))
        plan.field_units = {f: f.unit() for f in fields}
        plan.group.extend(plan.field_units.values())
        return plan

    # -- 2. the base, and binary splitting --------------------------------------

    def _try_base(self, group: list[Unit]) -> tuple[list[Unit], dict[Unit, Outcome | None]]:
        """(accepted units, rejected unit -> the outcome that showed it)."""
        out = self._ask([self._request(group)])[0]
        if out is None:
            return [], {}
        if out.kind is Kind.ACCEPTED:
            return group, {}
        self._require_minimal()
        accepted, rejected, _ = self._split(group, out)
        if accepted and rejected and not self._accepted_together(accepted):
            accepted = []
        return accepted, rejected

    def _require_minimal(self) -> None:
        minimal = self._ask([self._request([])])[0]
        if minimal is not None and minimal.kind is not Kind.ACCEPTED:
            raise ProbeError(
                "even the minimal INIT_VM request (no feature bits, GPAW 48, XFAM "
                f"0x{self.xfam:x}) is refused: {minimal.describe()}; nothing can be classified"
            )

    def _accepted_together(self, accepted: list[Unit]) -> bool:
        """Whether the accepted halves, never sent as one request, are accepted together."""
        check = self._ask([self._request(accepted)])[0]
        if check is not None and check.kind is not Kind.ACCEPTED:
            self.notes.append("the accepted units together were refused "
                              f"({check.describe()}); hidden bits tried on the minimal "
                              "request instead")
            return False
        return True

    def _split(self, units: list[Unit], first: Outcome
               ) -> tuple[list[Unit], dict[Unit, Outcome | None], list[Unit]]:
        """Binary splitting of a rejected group: (accepted, rejected -> outcome, untested).

        Groups known to hold a rejected unit test their left half only: if it
        is accepted, the rejection lies in the right half, untested.
        """
        accepted: list[Unit] = []
        rejected: dict[Unit, Outcome | None] = {}
        untested: list[Unit] = []
        # (group, the outcome that showed it holds a rejection, or None if not known)
        frontier: list[tuple[list[Unit], Outcome | None]] = [(units, first)]
        while frontier:
            asks: list[tuple[list[Unit], list[Unit], Outcome | None, bool]] = []
            nxt: list[tuple[list[Unit], Outcome | None]] = []
            for group, known in frontier:
                if known is not None and len(group) == 1:
                    rejected[group[0]] = known if known.kind is not Kind.ACCEPTED else None
                elif known is not None:
                    half = len(group) // 2
                    asks.append((group[:half], group[half:], known, True))
                else:
                    asks.append((group, [], None, False))
            outs = self._ask([self._request(g) for g, _, _, _ in asks])
            for (g, rest, known, halved), out in zip(asks, outs, strict=True):
                if out is None:
                    untested.extend(g + rest)
                    continue
                if out.kind is Kind.ACCEPTED:
                    accepted.extend(g)
                    if halved:
                        nxt.append((rest, known))
                else:
                    nxt.append((g, out))
                    if halved:
                        nxt.append((rest, None))
            frontier = nxt
        return accepted, rejected, untested

    # -- 3. lone units, and what the base showed ---------------------------------

    def _try_lone(self, plan: Plan, base: list[Unit]) -> None:
        outs = self._ask([self._request([*base, u]) for u, _ in plan.lone])
        for (u, reason), out in zip(plan.lone, outs, strict=True):
            if out is None:
                continue
            for key in plan.unit_bits[u]:
                if out.kind is Kind.ACCEPTED:
                    self.bits[key] = Classed(BitClass.REPORTED_ACCEPTED, out, None)
                else:
                    self.bits[key] = Classed(BitClass.REPORTED_REJECTED, out,
                                             reason or explain_rejected(key, out))

    def _record_base(self, plan: Plan, accepted: list[Unit],
                     rejected: dict[Unit, Outcome | None]) -> None:
        accepted_out = Outcome.classify(0, 0)
        for u in accepted:
            for key in plan.unit_bits.get(u, []):
                self.bits[key] = Classed(BitClass.REPORTED_ACCEPTED, accepted_out, None)
        for u, out in rejected.items():
            for key in plan.unit_bits.get(u, []):
                self.bits[key] = Classed(BitClass.REPORTED_REJECTED, out,
                                         explain_rejected(key, out))
        for f, u in plan.field_units.items():
            if u in rejected:
                self.fields.append((f, FieldClass.FIELD_REJECTED, rejected[u]))
            elif u in accepted:
                self.fields.append((f, FieldClass.FIELD_ACCEPTED, accepted_out))

    # -- 4. hidden bits, one per TD ----------------------------------------------

    def _try_hidden(self, base: list[Unit]) -> None:
        lay = self.layout
        hidden = hidden_targets(lay, self.model, exhaustive=self.exhaustive)
        reqs = [self._request([*base, lay.unit(*b)]) for b in hidden]
        gpaw52 = lay.request(base, xfam=self.xfam, gpaw=GPAW_5LEVEL)
        outs = self._ask([*reqs, gpaw52])
        if outs[-1] is not None:
            self.fields.append((gpaw_5level(lay), _field_class(outs[-1]), outs[-1]))
        pairs: list[tuple[BitKey, InitVm]] = []
        for b, out in zip(hidden, outs[:-1], strict=True):
            if out is None:
                continue
            key = lay.key(*b)
            cls = hidden_class(out)
            partner = lay.partner(*b)
            if cls is BitClass.HIDDEN_MODULE_REJECTED and partner is not None:
                # Alone it trips a rule like HLE == RTM; with its partners the
                # module may take it, and only then is it a hazard.
                pairs.append((key, self._request([*base, lay.unit(*b), partner])))
            self.bits[key] = Classed(cls, out, None)
        self._try_partners(pairs)

    def _try_partners(self, pairs: list[tuple[BitKey, InitVm]]) -> None:
        outs = self._ask([r for _, r in pairs])
        for (key, _), out in zip(pairs, outs, strict=True):
            if out is not None and out.kind is Kind.ACCEPTED:
                self.bits[key] = Classed(BitClass.HIDDEN_ACCEPTED, out, None)


def suspects(layout: Layout, model: Model | None) -> frozenset[BitKey]:
    """Reported bits the mirror says this kernel should hide.  Each is tried alone: a
    likely refusal inside the group would only cost halvings to find again."""
    exact = model.exact() if model is not None else None
    if model is None or exact is None:
        return frozenset()
    predicted = {(e.function, e.index): e for e in mirror.reported_entries(model.module, *exact)}
    out: set[BitKey] = set()
    for row, register in layout.feature_regs():
        e = layout.rows[row]
        p = predicted.get((e.function, e.index))
        extra = layout.reported(row, register) & ~(p.reg(register) if p is not None else 0)
        out.update(layout.key(row, register, b) for b in rules.bits_of(extra))
    return frozenset(out)


def hidden_class(out: Outcome) -> BitClass:
    if out.kind is Kind.ACCEPTED:
        return BitClass.HIDDEN_ACCEPTED
    if out.kind is Kind.MODULE_REJECTED:
        return BitClass.HIDDEN_MODULE_REJECTED
    if out.kind is Kind.ERROR and out.errno == errno.EIO:
        return BitClass.HIDDEN_MODULE_REJECTED  # the module failed the call
    return BitClass.HIDDEN_KVM_REJECTED


def _field_class(out: Outcome) -> FieldClass:
    return FieldClass.FIELD_ACCEPTED if out.kind is Kind.ACCEPTED else FieldClass.FIELD_REJECTED


def classify(caps: Capabilities, oracle: Oracle, model: Model | None, *, exhaustive: bool,
             native_fms: int | None) -> Classified:
    return _Prober(caps, oracle, model, exhaustive=exhaustive, native_fms=native_fms).run()


def expected_classes(module: ModuleProfile, host: Host, policy: Policy, *,
                     exhaustive: bool = True) -> dict[BitKey, BitClass]:
    """The classes the mirror says a kernel of `policy` gives (the same algorithm, the mirror
    as oracle, on the capabilities the mirror predicts)."""
    pred = mirror.predict_capabilities(module, host, policy, len(module.rows))
    if pred.caps is None:
        return {}
    got = classify(pred.caps, mirror_oracle(module, host, policy), Model(module, host, policy),
                   exhaustive=exhaustive, native_fms=host.native_fms())
    return {k: v.cls for k, v in got.bits.items()}


# ---------------------------------------------------------------------------
# 5. Explanations, and the results a report shows.


def explain_rejected(key: BitKey, out: Outcome | None) -> str | None:
    """A refusal the module's TSX_CTRL rule accounts for (it fails the call with EIO)."""
    c = rules.coupling_of(*key)
    if out is not None and out.kind is Kind.ERROR and out.errno == errno.EIO \
            and c is not None and c.tsx_ctrl:
        name = catalog.bit_name(key[0], key[1], key[2], rules.lowest_bit(c.mask))
        return f"module check: {name} needs TSX_CTRL on the host (the module refused with EIO)"
    return None


def explain_hidden(model: Model | None, key: BitKey) -> str | None:
    """A hidden bit accepted because the module drops it, not because KVM let it through."""
    if model is None or model.host is None:
        return None
    mi = model.row_index(key[0], key[1])
    if mi is None:
        return None
    if mirror.silently_cleared(model.module, model.host, mi, key[2]) >> key[3] & 1:
        return "the module drops it silently: an allow_direct bit this host lacks natively"
    return None


def mirror_reason(module: ModuleProfile, host: Host, policy: Policy, layout: Layout,
                  key: BitKey, out: Outcome | None) -> str | None:
    """The module coupling the mirror names for this bit, if the mirror also has the kernel
    report it and the module refuse it alone; else None (a kernel bug)."""
    pos = layout.position(key[0], key[1])
    predicted = {(e.function, e.index): e
                 for e in mirror.reported_entries(module, host, policy)}
    e = predicted.get((key[0], key[1]))
    if pos is None or e is None or not e.reg(key[2]) >> key[3] & 1:
        return None
    iv = layout.request([Unit(((pos, key[2], 1 << key[3]),))], xfam=layout.caps.supported_xfam)
    pred = mirror.predict_init_vm(module, host, policy, iv)
    if pred.kind is Kind.ACCEPTED or pred.decider is not Decider.MODULE:
        return None
    if out is not None and not pred.same_answer(out):
        return None
    return f"module coupling named by the mirror ({pred.check})"


def cleared_bits(layout: Layout, model: Model | None,
                 accepted: list[BitKey]) -> dict[BitKey, str]:
    """Of the accepted reported bits, those the TD does not get as asked, with the module's
    reason: the mirror's effective CPUID of one request carrying them all."""
    exact = model.exact() if model is not None else None
    if model is None or exact is None or not accepted:
        return {}
    units = []
    for leaf, index, register, bit in accepted:
        pos = layout.position(leaf, index)
        if pos is not None:
            units.append(Unit(((pos, register, 1 << bit),)))
    req = layout.request(units, xfam=layout.caps.supported_xfam)
    pred = mirror.init_vm_prediction(model.module, *exact, req)
    out: dict[BitKey, str] = {}
    wanted = set(accepted)
    for c in pred.changes:
        index = 0 if c.subleaf is None else c.subleaf
        for bit in rules.bits_of(c.mask):
            key = (c.leaf, index, c.register, bit)
            if key in wanted and c.kind in ("cleared", "overridden"):
                out[key] = f"accepted, cleared: {c.reason}"
    return out


def bit_results(got: Classified, layout: Layout, model: Model | None) -> list[BitResult]:
    """The classified bits in listing order, with the mirror's class when the model is exact.
    With the kernel's policy known, only the mirror may excuse a rejection."""
    exact = model.exact() if model is not None else None
    expected: dict[BitKey, BitClass] = {}
    if model is not None and exact is not None:
        expected = expected_classes(model.module, *exact, exhaustive=True)
    cleared = cleared_bits(layout, model, [k for k, c in got.bits.items()
                                           if c.cls is BitClass.REPORTED_ACCEPTED])
    out: list[BitResult] = []
    for key in sorted(got.bits, key=layout.order):
        cls, outcome, why = got.bits[key]
        if cls is BitClass.HIDDEN_ACCEPTED and why is None:
            why = explain_hidden(model, key)
        if cls is BitClass.REPORTED_REJECTED and model is not None and exact is not None:
            why = mirror_reason(model.module, *exact, layout, key, outcome)
        out.append(BitResult(*key, catalog.bit_name(*key), cls, outcome, why,
                             expected.get(key), cleared.get(key)))
    return out


def field_results(got: Classified, layout: Layout) -> list[FieldResult]:
    return [
        FieldResult(layout.rows[f.row].function, layout.rows[f.row].index, f.register, f.lo,
                    f.hi, f.name, f.value, cls, out, f.informational)
        for f, cls, out in got.fields
    ]

"""Every fault of a KVM_TDX_INIT_VM request, by replaying it through the model.

`mirror.predict_init_vm` names only the check that decides first.  To list
every bit at fault, the request is replayed: the deciding fault is recorded,
removed from the request (its bit cleared, its entry dropped, its value
zeroed, as the fault's kind says), and the request predicted again, until it
is accepted or a fault cannot be removed.  Only the mirror's public API and
the model's data (rules, policy, profiles) are used, and each fault is read
from the Outcome's check, decider and hw_error alone (reasons.CHECK_REASONS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from kvmtdx.explain.facts import (
    BitInfo,
    Dropped,
    bit_facts,
    bit_info,
    row_of,
    silently_dropped,
    xfam_label,
)
from kvmtdx.explain.reasons import CHECK_REASONS, TOPOLOGY_LEAF, Category, Reason, reason_of
from kvmtdx.model import mirror
from kvmtdx.model.mirror_kvm import find, lands_on
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import GPAW_FIELD, GPAW_LEAF, GPAW_SHIFT, coupling_of, gpaw_entry
from kvmtdx.outcome import Decider, Kind, Outcome
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry

# Each replay removes at least one bit, entry or word; a request lands on at most the
# module's rows (tens), 4 registers of 32 bits each, plus 256 entries and a few words.
MAX_REPLAYS = 8192


@dataclass(frozen=True, slots=True)
class Fault:
    """One reason the request is refused, with what decided it and what to change."""

    category: Category
    check: str | None
    decider: Decider | None
    outcome: Outcome  # what the request (as fixed so far) got at this step
    why: str
    fix: str
    bits: tuple[BitInfo, ...] = ()  # the CPUID bits at fault
    xfam_bits: int = 0  # XFAM bits at fault, or the ones a feature needs
    attribute_bits: int = 0
    entry: CpuidEntry | None = None  # an entry at fault as a whole
    facts: tuple[str, ...] = ()  # what else the model says about it


@dataclass(frozen=True, slots=True)
class Diagnosis:
    module: str
    host: str
    policy: str
    outcome: Outcome  # what the request as given gets
    faults: tuple[Fault, ...]
    final: Outcome  # what it gets with every fault removed
    fixed: Request
    stopped: str | None  # why the replay could not remove the last fault
    silent: tuple[Dropped, ...]  # accepted, yet dropped by the module without a word
    replays: int


@dataclass(frozen=True, slots=True)
class _World:
    module: ModuleProfile
    host: Host
    policy: Policy

    def predict(self, request: Request) -> Outcome:
        return mirror.predict_init_vm(self.module, self.host, self.policy, request)


def diagnose(module: ModuleProfile, host: Host, policy: Policy, request: Request) -> Diagnosis:
    world = _World(module, host, policy)
    first = outcome = world.predict(request)
    faults: list[Fault] = []
    current, stopped, replays = request, None, 1
    while outcome.kind != Kind.ACCEPTED and replays < MAX_REPLAYS:
        fault, following = _step(world, current, outcome)
        faults.append(fault)
        if following is None or following == current:
            stopped = f"cannot replay past: {fault.why}"
            break
        current, outcome = following, world.predict(following)
        replays += 1
    if outcome.kind != Kind.ACCEPTED and stopped is None:
        stopped = f"gave up after {replays} replays"
    accepted = outcome.kind == Kind.ACCEPTED
    silent = silently_dropped(module, host, policy, current) if accepted else ()
    return Diagnosis(module.name, host.name, policy.name, first, tuple(faults), outcome, current,
                     stopped, silent, replays)


def _step(world: _World, req: Request, outcome: Outcome) -> tuple[Fault, Request | None]:
    reason = reason_of(outcome)
    handler = _HANDLERS.get(reason.category, _unfixable)
    return handler(world, req, outcome, reason)


Handler = Callable[[_World, Request, Outcome, Reason], tuple[Fault, Request | None]]


def _fault(outcome: Outcome, reason: Reason, *, fix: str | None = None,
           bits: tuple[BitInfo, ...] = (), xfam_bits: int = 0, attribute_bits: int = 0,
           entry: CpuidEntry | None = None, facts: tuple[str, ...] = ()) -> Fault:
    return Fault(category=reason.category, check=outcome.check, decider=outcome.decider,
                 outcome=outcome, why=reason.why, fix=fix or reason.fix, bits=bits,
                 xfam_bits=xfam_bits, attribute_bits=attribute_bits, entry=entry, facts=facts)


def _unfixable(world: _World, req: Request, outcome: Outcome,
               reason: Reason) -> tuple[Fault, Request | None]:
    return _fault(outcome, reason), None


# --- CPUID bits -------------------------------------------------------------------


def _map_entries(req: Request, leaf: int, index: int,
                 change: Callable[[CpuidEntry], CpuidEntry]) -> Request:
    entries = tuple(change(e) if lands_on(e, leaf, index) else e for e in req.init_vm.entries)
    return replace(req, init_vm=replace(req.init_vm, entries=entries))


def _bit_fault(world: _World, req: Request, outcome: Outcome,
               reason: Reason) -> tuple[Fault, Request | None]:
    leaf, register, bit = outcome.leaf, outcome.register, outcome.bit
    if leaf is None or register is None or bit is None:
        return _value_fault(world, req, outcome, reason)
    index = outcome.subleaf or 0
    mask = 1 << bit
    coupling = coupling_of(leaf, index, register, bit)
    if reason.category == Category.COUPLING and coupling is not None:
        mask = coupling.mask
    found = find(req.init_vm.entries, leaf, index)
    value = found.reg(register) if found is not None else 0
    bits = tuple(bit_info(leaf, outcome.subleaf, register, b)
                 for b in range(32) if (mask & value or mask) >> b & 1)
    facts, xfam = bit_facts(world.module, world.host, world.policy, req, bits)
    fix = _bit_fix(reason, bits, xfam)
    following = _map_entries(req, leaf, index,
                             lambda e: e.with_reg(register, e.reg(register) & ~mask))
    return _fault(outcome, reason, bits=bits, xfam_bits=xfam, facts=facts, fix=fix), following


def _bit_fix(reason: Reason, bits: tuple[BitInfo, ...], xfam: int) -> str:
    names = ", ".join(b.vmm_label() for b in bits)
    if reason.category == Category.XFAM_RULE and xfam:
        return f"drop {names}, or add {xfam_label(xfam)}"
    if reason.category == Category.NOT_CONFIGURABLE and xfam:
        return f"drop {names}; a TD has it with {xfam_label(xfam)}"
    if reason.category == Category.COUPLING and len(bits) > 1:
        return f"{reason.fix}: {names}"
    return f"drop {names}"


def _value_fault(world: _World, req: Request, outcome: Outcome,
                 reason: Reason) -> tuple[Fault, Request | None]:
    """A rule on a value (family/model/stepping, the 0x1F topology): zero the value,
    which asks the module for the host's own."""
    leaf, register = outcome.leaf, outcome.register
    if leaf is None:
        return _fault(outcome, reason), None
    index = outcome.subleaf or 0
    regs = (register,) if register else REGISTERS

    def zero(e: CpuidEntry) -> CpuidEntry:
        for r in regs:
            e = e.with_reg(r, 0)
        return e

    if leaf == TOPOLOGY_LEAF:  # the topology rules read every sub-leaf together
        entries = tuple(zero(e) if e.function == leaf else e for e in req.init_vm.entries)
        following = replace(req, init_vm=replace(req.init_vm, entries=entries))
    else:
        following = _map_entries(req, leaf, index, zero)
    where = f"CPUID 0x{leaf:x}" + (f" {register.upper()}" if register else "")
    known = reason.category == Category.VALUE_RULE and outcome.check in CHECK_REASONS
    fix = reason.fix if known else f"zero {where} (the module then uses the host's values)"
    return _fault(outcome, reason, fix=fix), following


# --- attributes, XFAM, GPAW ---------------------------------------------------------


def _xfam_fault(world: _World, req: Request, outcome: Outcome,
                reason: Reason) -> tuple[Fault, Request | None]:
    if outcome.leaf is not None:  # a CPUID bit that needs XFAM state
        return _bit_fault(world, req, outcome, reason)
    if outcome.bit is None:
        return _fault(outcome, reason), None
    mask = 1 << outcome.bit
    iv = req.init_vm
    fix = f"drop {xfam_label(mask)} from XFAM (and the features that need it)"
    following = replace(req, init_vm=replace(iv, xfam=iv.xfam & ~mask))
    return _fault(outcome, reason, xfam_bits=mask, fix=fix), following


def _attributes_fault(world: _World, req: Request, outcome: Outcome,
                      reason: Reason) -> tuple[Fault, Request | None]:
    if outcome.bit is None:
        return _fault(outcome, reason), None
    mask = 1 << outcome.bit
    iv = req.init_vm
    following = replace(req, init_vm=replace(iv, attributes=iv.attributes & ~mask))
    return _fault(outcome, reason, attribute_bits=mask), following


def _gpaw_fault(world: _World, req: Request, outcome: Outcome,
                reason: Reason) -> tuple[Fault, Request | None]:
    iv = req.init_vm
    if not any(e.function == GPAW_LEAF for e in iv.entries):
        entries = (*iv.entries, gpaw_entry(48))
        nent = None if iv.nent is None else iv.nent + 1
        return _fault(outcome, reason), replace(req, init_vm=replace(iv, entries=entries,
                                                                     nent=nent))
    entries = tuple(e.with_reg("eax", e.eax & ~GPAW_FIELD | 48 << GPAW_SHIFT)
                    if e.function == GPAW_LEAF else e for e in iv.entries)
    return _fault(outcome, reason), replace(req, init_vm=replace(iv, entries=entries))


# --- entries and the ioctl's own words --------------------------------------------


def _landed(world: _World, entries: tuple[CpuidEntry, ...]) -> list[int]:
    """How many module rows KVM's lookup lands each entry on."""
    counts = [0] * len(entries)
    for row in world.module.rows:
        e = mirror.find(entries, row.leaf, row.kvm_index)
        if e is not None:
            counts[next(i for i, x in enumerate(entries) if x is e)] += 1
    return counts


def _entry_fault(world: _World, req: Request, outcome: Outcome,
                 reason: Reason) -> tuple[Fault, Request | None]:
    iv = req.init_vm
    counts = _landed(world, iv.entries)
    for i, (e, n) in enumerate(zip(iv.entries, counts, strict=True)):
        if n == 0:
            kept = iv.entries[:i] + iv.entries[i + 1:]
            nent = None if iv.nent is None else iv.nent - 1
            where = f"CPUID 0x{e.function:x} index {e.index}"
            why = (f"module {world.module.name} lists no configurable row for {where}"
                   if row_of(world.module, e.function, e.index) is None else
                   f"an earlier entry already took the row of {where}")
            return (_fault(outcome, reason, entry=e, facts=(why,)),
                    replace(req, init_vm=replace(iv, entries=kept, nent=nent)))
        if n > 1 and not e.flags & FLAG_SIGNIFICANT_INDEX:
            why = (f"CPUID 0x{e.function:x} index {e.index} has no significant-index flag, "
                   f"so it lands on {n} rows and is counted {n} times")
            flagged = replace(e, flags=e.flags | FLAG_SIGNIFICANT_INDEX)
            entries = (*iv.entries[:i], flagged, *iv.entries[i + 1:])
            return (_fault(outcome, reason, entry=e, facts=(why,),
                           fix="set KVM_CPUID_FLAG_SIGNIFCANT_INDEX on the entry"),
                    replace(req, init_vm=replace(iv, entries=entries)))
    if iv.nent is not None and iv.nent != len(iv.entries):
        why = f"cpuid.nent says {iv.nent} but {len(iv.entries)} entries follow"
        return (_fault(outcome, reason, facts=(why,), fix="send the true nent"),
                replace(req, init_vm=replace(iv, nent=None)))
    return _fault(outcome, reason), None


_STRUCTURE_FIXES: dict[str, Callable[[Request], Request]] = {
    "cmd_hw_error": lambda r: replace(r, hw_error=0),
    "cmd_flags": lambda r: replace(r, flags=0),
    "reserved_nonzero": lambda r: replace(r, init_vm=replace(r.init_vm, reserved=(0,) * 12)),
    "cpuid_padding": lambda r: replace(r, init_vm=replace(r.init_vm, cpuid_padding=0)),
}


def _structure_fault(world: _World, req: Request, outcome: Outcome,
                     reason: Reason) -> tuple[Fault, Request | None]:
    fix = _STRUCTURE_FIXES.get(outcome.check or "")
    return _fault(outcome, reason), (fix(req) if fix else None)


_HANDLERS: dict[Category, Handler] = {
    Category.HIDDEN_BY_POLICY: _bit_fault,
    Category.NOT_CONFIGURABLE: _bit_fault,
    Category.COUPLING: _bit_fault,
    Category.XFAM_RULE: _xfam_fault,
    Category.ATTRIBUTES: _attributes_fault,
    Category.GPAW: _gpaw_fault,
    Category.VALUE_RULE: _value_fault,
    Category.TOPOLOGY_RULE: _value_fault,
    Category.UNLISTED_LEAF: _entry_fault,
    Category.STRUCTURE: _structure_fault,
}

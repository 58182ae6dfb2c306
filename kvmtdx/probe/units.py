"""What a probe request is made of: the listed rows, units of bits that go in together,
value fields at valid values, and which hidden bits are worth a TD.

A unit respects the module's couplings (rules.MODULE_COUPLINGS: HLE with RTM), so a
coupling never passes for a kernel bug.  Bits the module clears rather than refuses
(a feature whose XSAVE state the TD's XFAM lacks, PKS set from ATTRIBUTES.PKS) need
no unit of their own: a request carrying them is accepted.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from kvmtdx.errors import ProbeError
from kvmtdx.knowledge import Knowledge
from kvmtdx.model import builders, catalog, rules
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import BUNDLED_MODULES, Host, ModuleProfile, load_profile
from kvmtdx.probe.result import BitKey
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, Capabilities, CpuidEntry, InitVm

GPAW_BASE, GPAW_5LEVEL = rules.GPAW_VALUES
FMS_LEAF = 1  # leaf 1 EAX: family/model/stepping
TOPOLOGY_LEAF = 0x1F
# A deterministic sample of the hidden bits targeted mode would otherwise skip.
SAMPLE_PER_REGISTER = 2

Part = tuple[int, str, int]  # row of the layout, register, value
Bit = tuple[int, str, int]  # row of the layout, register, bit number


@dataclass(frozen=True)
class Model:
    """A module profile, with the host and the kernel's policy when they are known."""

    module: ModuleProfile
    host: Host | None = None
    policy: Policy | None = None

    @staticmethod
    def of(know: Knowledge) -> Model | None:
        return None if know.module is None else Model(know.module, know.host, know.policy)

    def exact(self) -> tuple[Host, Policy] | None:
        """The host and policy, when both are known: what the mirror needs to predict."""
        return None if self.host is None or self.policy is None else (self.host, self.policy)

    def row_index(self, leaf: int, index: int) -> int | None:
        return next(iter(rows_at(self.module, leaf, index)), None)


def rows_at(module: ModuleProfile, leaf: int, index: int) -> list[int]:
    """The module's rows KVM lists at (leaf, index)."""
    return [i for i, row in enumerate(module.rows) if row.leaf == leaf and row.kvm_index == index]


@dataclass(frozen=True)
class Unit:
    """Bits that go into a request together: (row, register, value) parts plus attributes."""

    parts: tuple[Part, ...]
    attributes: int = 0


@dataclass(frozen=True)
class ValueField:
    """A field of a value register, tried at one valid value."""

    row: int
    register: str
    lo: int
    hi: int
    value: int
    name: str
    informational: bool = False
    # A field tried together with others (the 0x1F topology is valid only whole): every
    # part of the unit; empty for a field tried alone.
    parts: tuple[Part, ...] = ()

    def unit(self) -> Unit:
        return Unit(self.parts or ((self.row, self.register, self.value),))


@dataclass(frozen=True)
class Layout:
    """The listed rows and what a valid request needs, read off the capabilities."""

    caps: Capabilities
    rows: tuple[CpuidEntry, ...]
    flags: tuple[int, ...]
    value_regs: frozenset[tuple[int, str]]
    gpaw_row: int

    def key(self, row: int, register: str, bit: int) -> BitKey:
        e = self.rows[row]
        return (e.function, e.index, register, bit)

    def position(self, leaf: int, index: int) -> int | None:
        for i, e in enumerate(self.rows):
            if e.function == leaf and e.index == index:
                return i
        return None

    def order(self, k: BitKey) -> tuple[int, int, int, int]:
        """Sort key of a bit: listed row, index, register, bit."""
        pos = self.position(k[0], k[1])
        return (pos if pos is not None else 1 << 20, k[1], REGISTERS.index(k[2]), k[3])

    def reported(self, row: int, register: str) -> int:
        return self.rows[row].reg(register)

    def feature_regs(self) -> list[tuple[int, str]]:
        return [(i, r) for i in range(len(self.rows)) for r in REGISTERS
                if (i, r) not in self.value_regs]

    def reported_bits(self) -> list[Bit]:
        return [(row, register, bit) for row, register in self.feature_regs()
                for bit in rules.bits_of(self.reported(row, register))]

    def request(self, units: Iterable[Unit], *, xfam: int, gpaw: int = GPAW_BASE) -> InitVm:
        regs = [[0, 0, 0, 0] for _ in self.rows]
        regs[self.gpaw_row][0] = gpaw << rules.GPAW_SHIFT
        attributes = 0
        for u in units:
            attributes |= u.attributes
            for row, register, value in u.parts:
                regs[row][REGISTERS.index(register)] |= value
        entries = tuple(
            CpuidEntry(function=e.function, index=e.index, flags=f,
                       eax=r[0], ebx=r[1], ecx=r[2], edx=r[3])
            for e, f, r in zip(self.rows, self.flags, regs, strict=True)
        )
        return InitVm(attributes=attributes, xfam=xfam, entries=entries)

    # -- units that respect the module's couplings ------------------------------

    def coupling(self, row: int, register: str, bit: int) -> rules.Coupling | None:
        return rules.coupling_of(*self.key(row, register, bit))

    def unit(self, row: int, register: str, bit: int) -> Unit:
        return Unit(((row, register, 1 << bit),))

    def partner(self, row: int, register: str, bit: int) -> Unit | None:
        """The bits the module wants equal to this one, as a unit (None: no such coupling)."""
        c = self.coupling(row, register, bit)
        if c is None:
            return None
        return Unit(((row, register, c.mask & ~(1 << bit)),))

    def coupling_unmet(self, row: int, register: str, bit: int) -> str | None:
        """A module coupling that no request within the capabilities can meet for this bit."""
        c = self.coupling(row, register, bit)
        if c is not None:
            partners = c.mask & ~(1 << bit)
            if self.reported(row, register) & partners != partners:
                return f"module coupling: {c.why}, and the other is not reported"
        return None


def read_layout(caps: Capabilities, model: Model | None) -> Layout:
    rows = caps.entries
    if not rows:
        raise ProbeError("KVM_TDX_CAPABILITIES lists no CPUID rows: nothing to probe")
    gpaw_row = next((i for i, e in enumerate(rows)
                     if e.function == rules.GPAW_LEAF and e.index == 0), None)
    if gpaw_row is None:
        raise ProbeError("KVM_TDX_CAPABILITIES lists no leaf 0x80000008 row at index 0, so "
                         "no INIT_VM request can carry the GPAW KVM requires")
    flags: list[int] = []
    value_regs: set[tuple[int, str]] = set()
    for i, e in enumerate(rows):
        subleaf: int | None = e.index
        if model is not None:
            mi = model.row_index(e.function, e.index)
            if mi is not None:
                subleaf = model.module.rows[mi].subleaf
        # A row without sub-leaves may go unflagged; a row with them must be
        # flagged, or one entry would match every sub-leaf of its leaf.
        flags.append(0 if model is not None and subleaf is None else FLAG_SIGNIFICANT_INDEX)
        for r in REGISTERS:
            if rules.is_value_register(e.function, subleaf, r):
                value_regs.add((i, r))
    return Layout(caps, rows, tuple(flags), frozenset(value_regs), gpaw_row)


# ---------------------------------------------------------------------------
# Value fields.


def runs(mask: int) -> list[tuple[int, int]]:
    """(lo, hi) of each run of contiguous set bits in a 32-bit mask."""
    out: list[tuple[int, int]] = []
    for bit in rules.bits_of(mask):
        if out and out[-1][1] == bit - 1:
            out[-1] = (out[-1][0], bit)
        else:
            out.append((bit, bit))
    return out


def field_spans(leaf: int, subleaf: int, register: str, mask: int) -> list[tuple[int, int, str]]:
    """The catalog's fields that hold reported bits, then runs of reported bits no field names."""
    out: list[tuple[int, int, str]] = []
    covered = 0
    for f in catalog.fields(leaf, subleaf, register):
        if mask & f.mask:
            bits = mask & f.mask
            out.append((rules.lowest_bit(bits), bits.bit_length() - 1, f.label()))
            covered |= f.mask
    for lo, hi in runs(mask & ~covered):
        out.append((lo, hi, f"bits {hi}:{lo}"))
    return sorted(out)


def value_fields(layout: Layout, native_fms: int | None) -> tuple[list[ValueField], list[str]]:
    """The reported fields of value registers, each at a valid value (its lowest bit, or the
    native FMS), and notes on those that cannot be tried."""
    out: list[ValueField] = []
    notes: list[str] = []
    topology = topology_field(layout)
    if topology is not None:
        out.append(topology)
    for row, register in sorted(layout.value_regs):
        e = layout.rows[row]
        if e.function == TOPOLOGY_LEAF:
            continue
        mask = e.reg(register)
        if e.function == rules.GPAW_LEAF and register == "eax":
            mask &= ~rules.GPAW_FIELD
        if not mask:
            continue
        if e.function == FMS_LEAF and register == "eax":
            # Family/model/stepping: the module takes 0 (native) or exactly the native value.
            if native_fms:
                out.append(ValueField(row, register, 0, 31, native_fms & mask, "FMS (native)"))
            else:
                notes.append("leaf 1 EAX (FMS) not probed: the native value is unknown")
            continue
        for lo, hi, name in field_spans(e.function, e.index, register, mask):
            out.append(ValueField(row, register, lo, hi, 1 << lo, name))
    return out, notes


def topology_field(layout: Layout) -> ValueField | None:
    """Leaf 0x1F as one field: the module checks its sub-leaves together (levels rising
    from sub-leaf 0, a core level), so a field alone is no valid value.  Tried as an SMT
    and a core level (builders.REALISTIC_VALUES) inside what was reported."""
    parts: list[Part] = []
    for (leaf, index), typical in builders.REALISTIC_VALUES.items():
        row = layout.position(leaf, index) if leaf == TOPOLOGY_LEAF else None
        if row is None:
            continue
        for register, value in zip(REGISTERS, typical, strict=True):
            if value & layout.reported(row, register):
                parts.append((row, register, value & layout.reported(row, register)))
    if not parts:
        return None
    row, register, value = parts[0]
    return ValueField(row, register, 0, 31, value, "0x1F topology (SMT and core levels)",
                      parts=tuple(parts))


def gpaw_5level(layout: Layout) -> ValueField:
    """GPAW 52, which only a host with 5-level EPT can give: informational."""
    return ValueField(layout.gpaw_row, "eax", rules.GPAW_SHIFT, rules.GPAW_SHIFT + 7,
                      GPAW_5LEVEL << rules.GPAW_SHIFT, "GPAW=52 (needs 5-level EPT)",
                      informational=True)


# ---------------------------------------------------------------------------
# Hidden bits worth a TD.


def hidden_targets(layout: Layout, model: Model | None, *, exhaustive: bool) -> list[Bit]:
    """Every hidden bit (exhaustive), or those a module could take plus a fixed sample."""
    out: list[Bit] = []
    for row, register in layout.feature_regs():
        e = layout.rows[row]
        hidden = ~layout.reported(row, register) & rules.FULL
        if not exhaustive:
            wanted = interesting(model, e.function, e.index, register) & hidden
            rest = [b for b in rules.bits_of(hidden) if not wanted >> b & 1]
            rng = random.Random(f"{e.function:x}.{e.index}.{register}")
            for b in rng.sample(rest, min(SAMPLE_PER_REGISTER, len(rest))):
                wanted |= 1 << b
            hidden = wanted
        out.extend((row, register, b) for b in rules.bits_of(hidden))
    return out


def interesting(model: Model | None, leaf: int, index: int, register: str) -> int:
    """Bits whose class can differ between policies or between KVM and the module:
    those the module could take (config_direct | allow_direct)."""
    r = REGISTERS.index(register)
    profiles = ([model.module] if model is not None
                else [load_profile(n) for n in BUNDLED_MODULES])
    mask = 0
    for p in profiles:
        for i in rows_at(p, leaf, index):
            mask |= p.rows[i].module_allows()[r]
    return mask

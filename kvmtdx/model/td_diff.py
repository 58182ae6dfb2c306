"""The TD's CPUID beside the request: every bit of a CPUID_CONFIG row that differs, and why.

The request's value of a row is the entry KVM's lookup lands on it (kvm_find_cpuid_entry2,
`mirror.find`), zeros where none does; the TD's is what KVM_TDX_GET_CPUID returned.  Each
differing bit gets one kind, first match wins:

- the TDX module's own rules, as the module model predicts them (`Change`): `cleared`
  (silently: an allow_direct bit the CPU lacks, XSAVE state XFAM lacks), `forced_1`,
  `overridden` (PKS and LASS from the attributes, F/M/S 0 as the native one, ...);
- leaf 0x80000008 EAX[23:16]: `overridden` by KVM, which reports its GPAW there;
- a bit the module does not let the request configure: `forced_1` or `cleared` where its
  tables fix it, else `native` (the CPU's value);
- anything else `unexplained`: a configurable bit the model did not expect to change;
- without a module profile, `differs`: nothing here can say why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvmtdx.model.catalog import BitRef
from kvmtdx.model.get_cpuid import GPA_BITS_FIELD, entry_regs
from kvmtdx.model.mirror import find
from kvmtdx.model.profiles import ModuleProfile
from kvmtdx.model.rules import bits_of, is_value_register
from kvmtdx.model.tdx_module import Change
from kvmtdx.model.tdx_module_tables import Regs
from kvmtdx.structs import REGISTERS, CpuidEntry

ZERO: Regs = (0, 0, 0, 0)
NO_PROFILE = "no module profile to say why (give --module)"
KVM_GPAW = "KVM reports its guest physical address width (GPAW) here"
NATIVE = "not configurable: the TD gets the CPU's value"
FIXED_1 = "not configurable: fixed to 1 in the module's tables"
FIXED_0 = "not configurable: fixed to 0 (or dynamic) in the module's tables"
UNEXPLAINED = "configurable, yet the module model expected the requested value"
KINDS = ("cleared", "forced_1", "overridden", "native", "unexplained", "differs")


@dataclass(frozen=True, slots=True)
class BitDiff:
    """Bits of one row register the TD has other than the request asked, of one kind."""

    leaf: int
    subleaf: int | None
    register: str
    mask: int
    asked: int  # the whole register as requested
    got: int  # the whole register as the TD has it
    kind: str
    reason: str


@dataclass(frozen=True, slots=True)
class Row:
    leaf: int
    subleaf: int | None  # as the TD's CPUID names it: None for a leaf without sub-leaves
    kvm_index: int  # the index KVM's lookup matches


def rows_of(module: ModuleProfile | None, reported: Sequence[CpuidEntry]) -> tuple[Row, ...]:
    """The CPUID_CONFIG rows: the module's, or without a profile the rows KVM reported."""
    if module is not None:
        return tuple(Row(r.leaf, r.subleaf, r.kvm_index) for r in module.rows)
    return tuple(Row(e.function, e.index, e.index) for e in reported)


def _fixed(module: ModuleProfile, row: Row, reg: int) -> tuple[int, int, int]:
    """(configurable, fixed-1, fixed-0) bits of a row register in the module's tables."""
    i = module.row_index(row.leaf, row.subleaf)
    allowed = module.rows[i].module_allows()[reg] if i is not None else 0
    entry = next((e for e in module.tables.lookup if e.key == (row.leaf, row.subleaf)), None)
    if entry is None:
        return allowed, 0, 0
    return allowed, entry.fixed1[reg], entry.fixed0_or_dynamic[reg]


def _explain(module: ModuleProfile | None, changes: Sequence[Change], row: Row, reg: int,
             diff: int) -> list[tuple[int, str, str]]:
    """(mask, kind, reason) covering every bit of `diff`."""
    if module is None:
        return [(diff, "differs", NO_PROFILE)]
    out: list[tuple[int, str, str]] = []
    name = REGISTERS[reg]
    for c in changes:
        if (c.leaf, c.subleaf, c.register) == (row.leaf, row.subleaf, name) and diff & c.mask:
            out.append((diff & c.mask, c.kind, c.reason))
            diff &= ~c.mask
    if row.leaf == 0x80000008 and name == "eax" and diff & GPA_BITS_FIELD:
        out.append((diff & GPA_BITS_FIELD, "overridden", KVM_GPAW))
        diff &= ~GPA_BITS_FIELD
    allowed, fixed1, fixed0 = _fixed(module, row, reg)
    for mask, kind, reason in ((diff & ~allowed & fixed1, "forced_1", FIXED_1),
                               (diff & ~allowed & fixed0, "cleared", FIXED_0),
                               (diff & ~allowed & ~fixed1 & ~fixed0, "native", NATIVE),
                               (diff & allowed, "unexplained", UNEXPLAINED)):
        if mask:
            out.append((mask, kind, reason))
    return out


def differences(module: ModuleProfile | None, rows: Sequence[Row],
                request: Sequence[CpuidEntry], td: Sequence[CpuidEntry],
                changes: Sequence[Change] = ()) -> tuple[BitDiff, ...]:
    """Every bit of every row where the TD's CPUID is not what the request asked."""
    out: list[BitDiff] = []
    for row in rows:
        matched = find(request, row.leaf, row.kvm_index)
        asked = matched.regs() if matched is not None else ZERO
        got = entry_regs(td, row.leaf, row.subleaf)
        if got is None:
            continue  # the TD's CPUID has no such leaf to compare with
        for reg, (a, g) in enumerate(zip(asked, got, strict=True)):
            for mask, kind, reason in _explain(module, changes, row, reg, a ^ g) if a ^ g \
                    else ():
                out.append(BitDiff(row.leaf, row.subleaf, REGISTERS[reg], mask, a, g, kind,
                                   reason))
    return tuple(out)


def smuggled(rows: Sequence[Row], reported: Sequence[CpuidEntry], request: Sequence[CpuidEntry],
             td: Sequence[CpuidEntry]) -> tuple[BitRef, ...]:
    """Feature bits the request set, KVM never reported, and the TD has: a hidden bit that
    got past KVM (upstream's denylist bypass puts WAITPKG here)."""
    out: list[BitRef] = []
    for row in rows:
        rep = next((e.regs() for e in reported
                    if (e.function, e.index) == (row.leaf, row.kvm_index)), None)
        matched = find(request, row.leaf, row.kvm_index)
        got = entry_regs(td, row.leaf, row.subleaf)
        if rep is None or matched is None or got is None:
            continue
        for name, r, a, g in zip(REGISTERS, rep, matched.regs(), got, strict=True):
            if not is_value_register(row.leaf, row.subleaf, name):
                out += [BitRef(row.leaf, row.subleaf, name, b) for b in bits_of(a & g & ~r)]
    return tuple(out)

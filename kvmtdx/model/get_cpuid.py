"""KVM_TDX_GET_CPUID as the mirror predicts it: Linux 7.3's walk over what TDH.MNG.RD gives.

The TD's CPUID lives in the TDX module (TDCS CPUID_VALUES, one 128-bit value per
cpuid_lookup[] entry, as TDH.MNG.INIT left it: `InitVmPrediction.effective`).  KVM reads it
back (arch/x86/kvm/vmx/tdx.c, tdx_vcpu_get_cpuid, tdx_vcpu_get_cpuid_leaf, tdx_read_cpuid):

- leaf 0, then leaves 1 to CPUID(0).EAX, then 0x80000000, then 0x80000001 to its EAX;
- each leaf first without a sub-leaf (the field id's SUBLEAF_NA); if the module refuses
  that read, sub-leaves 0, 1, ... until the first it refuses (none at all: no entry);
- a refused leaf 0 or 0x80000000 makes the whole call -EIO; other refusals just skip;
- leaves with bits 30:7 set, sub-leaves above 0x7f and a 257th entry are never read;
- an entry read with a sub-leaf carries the significant-index flag and its sub-leaf as
  index, one read without has index 0 and no flag;
- leaf 0x80000008 EAX[23:16] is KVM's guest physical address width (48, or 52 with
  MAX_GPAW), not the module's value (the "old TDX modules" workaround).

What TDH.MNG.RD answers for CPUID_VALUES (intel/tdx-module metadata_td.c,
md_td_get_element): the first cpuid_lookup[] entry of that leaf whose sub-leaf is the
one asked or "none" (get_cpuid_lookup_entry); no entry: FIELD_ID_INCORRECT (1.5.x), or on
2.0 all zeros when the leaf is in the TD's CPUID_FIXED0_BITMAP, else NOT_READABLE; 1.5.x
refuses a faulting entry (CPUID_VALID 0), 2.0 reads zeros for every fixed-0 leaf.  The
bitmap's layout (leaf n below CPUID_FIXED0_BITMAP_BASE_RANGE is bit n, leaf 0x80000000+n
bit BASE_RANGE+n) is read off the bitmap's own data: is_cpuid_fixed0's body was not among
the sources read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvmtdx.model.mirror_module import InitVmPrediction
from kvmtdx.model.profiles import ModuleProfile
from kvmtdx.model.tdx_cpuid import FLAG_GPAW
from kvmtdx.model.tdx_module_tables import ModuleTables, Regs
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, KVM_MAX_CPUID_ENTRIES, REGISTERS, CpuidEntry

EXTENDED = 0x80000000
UNREADABLE_LEAF = 0x7FFFFF80  # GENMASK(30, 7)
LAST_SUBLEAF = 0x7F
GPA_BITS_FIELD = 0x00FF0000
ZERO: Regs = (0, 0, 0, 0)
Key = tuple[int, int | None]


@dataclass(frozen=True, slots=True)
class TdCpuid:
    """What the TDX module holds for one TD: the CPUID_VALUES of every lookup entry and the
    entries the host cannot read (CPUID_VALID 0)."""

    tables: ModuleTables
    values: Mapping[Key, Regs]
    unreadable: frozenset[Key] = frozenset()

    def fixed0(self, leaf: int) -> bool:
        """Whether the TD's CPUID_FIXED0_BITMAP marks the leaf all-zero (2.0 on)."""
        bitmap = self.tables.constants.get("CPUID_FIXED0_BITMAP")
        base = self.tables.constants.get("CPUID_FIXED0_BITMAP_BASE_RANGE")
        if bitmap is None or base is None:
            return False
        bit = leaf if leaf < base else leaf - EXTENDED + base if leaf >= EXTENDED else 64
        return 0 <= bit < 64 and bool(bitmap >> bit & 1)

    def read(self, leaf: int, subleaf: int | None) -> Regs | None:
        """TDH.MNG.RD of CPUID_VALUES for (leaf, sub-leaf or none): None when refused."""
        entry = next((e for e in self.tables.lookup if e.leaf == leaf
                      and (e.subleaf is None or e.subleaf == subleaf)), None)
        if self.fixed0(leaf):
            return ZERO
        if entry is None or entry.key in self.unreadable:
            return None
        return self.values.get(entry.key, ZERO)


class _Walk:
    """tdx_vcpu_get_cpuid's loop, entry by entry."""

    def __init__(self, td: TdCpuid, gpaw: int) -> None:
        self.td = td
        self.gpaw = gpaw
        self.entries: list[CpuidEntry] = []

    def read(self, leaf: int, subleaf: int, with_subleaf: bool) -> bool:
        """tdx_read_cpuid: whether an entry was added (False covers -EINVAL and -EIO)."""
        if subleaf > LAST_SUBLEAF or len(self.entries) >= KVM_MAX_CPUID_ENTRIES \
                or leaf & UNREADABLE_LEAF:
            return False
        regs = self.td.read(leaf, subleaf if with_subleaf else None)
        if regs is None:
            return False
        a, b, c, d = regs
        if leaf == 0x80000008:
            a = (a & ~GPA_BITS_FIELD) | (self.gpaw & 0xFF) << 16
        self.entries.append(CpuidEntry(leaf, subleaf if with_subleaf else 0,
                                       FLAG_SIGNIFICANT_INDEX if with_subleaf else 0,
                                       a, b, c, d))
        return True

    def leaf(self, leaf: int) -> bool:
        """tdx_vcpu_get_cpuid_leaf: whether the leaf gave at least one entry."""
        if self.read(leaf, 0, False):
            return True
        if leaf & UNREADABLE_LEAF or len(self.entries) >= KVM_MAX_CPUID_ENTRIES:
            return False  # -EINVAL: no sub-leaf is tried
        sub = 0
        while self.read(leaf, sub, True):
            sub += 1
        return sub > 0

    def range(self, first: int) -> bool:
        """Leaf `first`, then every leaf up to the EAX it gives; False: -EIO."""
        if not self.leaf(first):
            return False
        level = (self.entries[0] if first == 0 else self.entries[-1]).eax
        # Leaves with bits 30:7 set are never read: the rest of the range adds nothing.
        for leaf in range(first + 1, min(level, first + LAST_SUBLEAF) + 1):
            self.leaf(leaf)
        return True


def get_cpuid(td: TdCpuid, gpaw: int) -> tuple[CpuidEntry, ...] | None:
    """The entries KVM_TDX_GET_CPUID returns for this TD (None: it fails with -EIO)."""
    walk = _Walk(td, gpaw)
    if not walk.range(0) or not walk.range(EXTENDED):
        return None
    return tuple(walk.entries)


def entry_regs(entries: Sequence[CpuidEntry], leaf: int, subleaf: int | None) -> Regs | None:
    """The registers KVM_TDX_GET_CPUID gave for (leaf, sub-leaf or none), if it gave any: an
    entry read with that sub-leaf, or the leaf's entry read without one."""
    loose = None
    for e in entries:
        if e.function != leaf:
            continue
        if e.significant_index and e.index == subleaf:
            return e.regs()
        if not e.significant_index and loose is None:
            loose = e.regs()
    return loose


EntryKey = tuple[int, int, int]  # function, index, flags of a KVM_TDX_GET_CPUID entry


def unknown_bits(module: ModuleProfile) -> dict[EntryKey, Regs]:
    """Per entry of the TD's CPUID: the bits a saved profile marks unknown (hidden by the
    policy it was saved under), which no prediction of the TD can know."""
    out = {}
    for i, row in enumerate(module.rows):
        mask = module.unknown_mask(i)
        if any(mask):
            flags = 0 if row.subleaf is None else FLAG_SIGNIFICANT_INDEX
            out[(row.leaf, row.kvm_index, flags)] = mask
    return out


def entry_label(e: CpuidEntry) -> str:
    """An entry of a TD's CPUID as reports name it: its leaf, and its sub-leaf if flagged."""
    return f"0x{e.function:x}" + (f".{e.index}" if e.significant_index else "")


def differing_registers(got: CpuidEntry, want: CpuidEntry,
                        excused: Regs = (0, 0, 0, 0)) -> list[tuple[str, int, int]]:
    """Each register (name, got, want) where an entry of the TD's CPUID departs from its
    prediction in a bit not `excused` (unknown_bits: what the profile cannot know)."""
    return [(r, a, b) for r, a, b, x in zip(REGISTERS, got.regs(), want.regs(), excused,
                                            strict=True) if (a ^ b) & ~x]


def gpaw_of(config_flags: int) -> int:
    """The guest physical address width KVM set up: 52 with TD_PARAMS' MAX_GPAW, else 48."""
    return 52 if config_flags & 1 << FLAG_GPAW else 48


def predicted(tables: ModuleTables, pred: InitVmPrediction) -> tuple[CpuidEntry, ...] | None:
    """KVM_TDX_GET_CPUID after the INIT_VM `pred` foresees (None: not accepted, or -EIO)."""
    if pred.effective is None or pred.td_params is None:
        return None
    return get_cpuid(TdCpuid(tables, pred.effective, pred.faulting),
                     gpaw_of(pred.td_params.config_flags))

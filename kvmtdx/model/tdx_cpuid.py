"""TDH.MNG.INIT's CPUID pass: read_and_set_cpuid_configurations, leaf by leaf, in lookup order.

Source: intel/tdx-module src/vmm_dispatcher/api_calls/tdh_mng_init.c
(read_and_set_cpuid_configurations, apply_cpuid_xfam_masks) and
src/common/helpers/cpuid_fms.c (check_fms_config).  The working state `Td` is
the TDCS being built; every value change is recorded with its reason so the
caller can say which requested bits were cleared, forced or overridden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvmtdx.model import tdx_status as st
from kvmtdx.model.memo import per_object
from kvmtdx.model.tdx_host import Host
from kvmtdx.model.tdx_module_tables import ZERO, LookupEntry, ModuleTables, Regs
from kvmtdx.status import operand_invalid

MNG_INIT = "src/vmm_dispatcher/api_calls/tdh_mng_init.c"
HELPERS = "src/common/helpers/helpers.c"
NO_SUBLEAF = 0xFFFFFFFF

# td_param_attributes_t bit positions (include/tdx_api_defs.h).
ATTR_DEBUG, ATTR_ICSSD, ATTR_LASS, ATTR_MIGRATABLE = 0, 16, 27, 29
ATTR_PKS, ATTR_PERFMON = 30, 63
# config_flags_t (include/tdx_api_defs.h; MAXPA/MAXGPA in 2.0).
FLAG_GPAW, FLAG_MAXPA_VIRT, FLAG_MAXGPA_VIRT = 0, 3, 4


class Unmodelled(ValueError):
    """A TD_PARAMS path whose rule kvmtdx has not read from the module source."""


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    rule: str
    source: str
    rcx: int = 0
    leaf: int | None = None
    subleaf: int | None = None
    register: str | None = None
    mask: int = 0


@dataclass(slots=True)
class Event:
    position: int
    register: int
    mask: int
    override: bool
    reason: str


@dataclass(slots=True)
class Td:
    """The TDCS under construction: CPUID values per lookup position, flags, change log."""

    tables: ModuleTables
    host: Host
    attributes: int
    xfam: int
    config_flags: int
    tsc_frequency: int
    config: tuple[Regs, ...]  # TD_PARAMS CPUID values per CPUID_CONFIG row
    native: tuple[Regs, ...]  # sampled native per lookup position
    values: list[Regs] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    flags: dict[str, bool] = field(default_factory=dict)
    bitmap_23: int = 0
    log: bool = True  # record what changed and why (only an accepted TD's report needs it)

    def attr(self, bit: int) -> bool:
        return bool(self.attributes >> bit & 1)

    def set(self, pos: int, new: Regs, reason: str, override: bool = False,
            written: Regs | None = None) -> None:
        """Store a value; log the bits it changed, or for an override the bits it writes."""
        if not self.log:
            self.values[pos] = new
            return
        for reg, (old, value) in enumerate(zip(self.values[pos], new, strict=True)):
            mask = old ^ value
            if written is not None:
                mask |= written[reg]
            if mask:
                self.events.append(Event(pos, reg, mask, override, reason))
        self.values[pos] = new

    def position(self, leaf: int, subleaf: int | None) -> int:
        pos = positions(self.tables).get((leaf, subleaf))
        if pos is None:
            raise KeyError(f"module {self.tables.name} has no lookup entry 0x{leaf:x}.{subleaf}")
        return pos


@per_object
def positions(tables: ModuleTables) -> dict[tuple[int, int | None], int]:
    """(leaf, sub-leaf) -> position in the lookup (processing) order."""
    return {e.key: pos for pos, e in enumerate(tables.lookup)}


def leaf_rcx(leaf: int, subleaf: int | None) -> int:
    """cpuid_config_leaf_subleaf_t.raw: the extended error information in RCX."""
    return leaf | (NO_SUBLEAF if subleaf is None else subleaf) << 32


def cpuid_refusal(e: LookupEntry, rule: str, source: str, rcx: bool = True,
                  register: str | None = None, mask: int = 0) -> Refusal:
    return Refusal(operand_invalid(st.OPERAND_ID_CPUID_CONFIG), rule, source,
                   leaf_rcx(e.leaf, e.subleaf) if rcx else 0, e.leaf, e.subleaf, register, mask)


def configured_row(td: Td, pos: int, e: LookupEntry) -> Refusal | None:
    """The per-register mask check and the value computation for a CPUID_CONFIG row."""
    row = td.tables.configurable[e.config_index] if e.config_index is not None else None
    if row is None:
        return None
    cfg = td.config[e.config_index] if e.config_index is not None else ZERO
    out = list(td.values[pos])
    for i in range(4):
        extra = cfg[i] & ~(row.config_direct[i] | row.allow_direct[i])
        if extra:
            return cpuid_refusal(e, "cpuid_config_mask", f"{MNG_INIT}: read_and_set_cpuid_"
                                 "configurations", register=("eax", "ebx", "ecx", "edx")[i],
                                 mask=extra)
        v = (out[i] & ~e.fixed0_or_dynamic[i]) | e.fixed1[i]
        v = (v & ~row.config_direct[i]) | (cfg[i] & row.config_direct[i])
        lacking = cfg[i] & row.allow_direct[i] & ~v
        if lacking and td.log:
            td.events.append(Event(pos, i, lacking, False, "allow_direct and the host lacks "
                                   "it: the CPU's native bit is 0"))
        out[i] = v & (cfg[i] | ~row.allow_direct[i])
    td.values[pos] = (out[0], out[1], out[2], out[3])
    return None


def xfam_masked(td: Td, pos: int, table: str) -> None:
    """apply_cpuid_xfam_masks: clear the bits of every XFAM bit that is 0.  The change log
    names, for each cleared bit, the XFAM bits whose absence cleared it."""
    top = td.tables.const("XCR0_MAX_VALID_BIT")
    missing = [(b, td.tables.xfam_mask(table, b)) for b in range(top + 1)
               if not td.xfam >> b & 1]
    if not td.log:
        value = list(td.values[pos])
        for _, mask in missing:
            value = [v & ~m for v, m in zip(value, mask, strict=True)]
        td.values[pos] = (value[0], value[1], value[2], value[3])
        return
    groups: dict[tuple[int, ...], list[int]] = {}
    for reg, v in enumerate(td.values[pos]):
        for bit in range(32):
            why = tuple(b for b, mask in missing if (v & mask[reg]) >> bit & 1)
            if why:
                groups.setdefault(why, [0, 0, 0, 0])[reg] |= 1 << bit
    for why, cleared in groups.items():
        now = td.values[pos]
        bits = ", ".join(str(b) for b in why)
        td.set(pos, (now[0] & ~cleared[0], now[1] & ~cleared[1], now[2] & ~cleared[2],
                     now[3] & ~cleared[3]),
               f"the TD's XFAM lacks bit{'s' if len(why) > 1 else ''} {bits} ({table})")


def zero_unless(td: Td, pos: int, keep: bool, reason: str) -> None:
    if not keep:
        td.set(pos, ZERO, reason)


def with_reg(regs: Regs, reg: int, value: int) -> Regs:
    out = list(regs)
    out[reg] = value & 0xFFFFFFFF
    return (out[0], out[1], out[2], out[3])


def with_bit(regs: Regs, reg: int, bit: int, on: bool) -> Regs:
    value = regs[reg] | (1 << bit) if on else regs[reg] & ~(1 << bit)
    return with_reg(regs, reg, value)


# The XFAM mask table apply_cpuid_xfam_masks uses per row, and (leaf 1) the one XFAM bit
# whose mask the leaf-1 rule applies.
XFAM_MASK_TABLES: dict[tuple[int, int | None], str] = {
    (1, None): "xfam_mask_0x1_0xffffffff", (7, 0): "xfam_mask_0x7_0x0",
    (7, 1): "xfam_mask_0x7_0x1", (0xD, 0): "xfam_mask_0xd_0x0", (0xD, 1): "xfam_mask_0xd_0x1",
}
WHOLE_LEAF_XFAM: dict[int, int] = {0x14: 1 << 8, 0x1C: 1 << 15, 0x1D: 1 << 17 | 1 << 18}


def xfam_needed(tables: ModuleTables, leaf: int, subleaf: int | None, register: str,
                bit: int) -> int:
    """The XFAM bits a TD needs, all of them, for the module to leave this CPUID bit as
    configured: without one of them the module clears it (never refuses it)."""
    if leaf in WHOLE_LEAF_XFAM:
        return WHOLE_LEAF_XFAM[leaf]
    if leaf == 0xD and subleaf is not None and 2 <= subleaf <= tables.const("XCR0_MAX_VALID_BIT"):
        return 1 << subleaf
    table = XFAM_MASK_TABLES.get((leaf, subleaf))
    if table is None:
        return 0
    reg = ("eax", "ebx", "ecx", "edx").index(register)
    xfam_bits = (2,) if leaf == 1 else range(tables.const("XCR0_MAX_VALID_BIT") + 1)
    return sum(1 << b for b in xfam_bits if tables.xfam_mask(table, b)[reg] >> bit & 1)


# ---------------------------------------------------------------------------
# F/M/S (leaf 1 EAX).

def check_fms_config(tables: ModuleTables, platform: int, fms: int) -> bool:
    """cpuid_fms.c: an older or equal stepping of this platform's or an older listed model."""
    def same_model(a: int, b: int) -> bool:
        return a & ~0xF == b & ~0xF

    if same_model(platform, fms) and fms & 0xF > platform & 0xF:
        return False
    table = tables.allowed_fms
    start = next((i for i, f in enumerate(table) if same_model(platform, f)), None)
    if start is None:  # the module's FATAL_ERROR; host_problems reports such a host
        return False
    found = False
    for allowed in table[start:]:
        if same_model(fms, allowed):
            found = True
            if fms & 0xF > allowed & 0xF:
                return False
    return found


def leaf_1(td: Td, pos: int, e: LookupEntry) -> Refusal | None:
    v = td.values[pos]
    platform = td.host.fms
    fms = v[0]
    checked = True
    if fms == 0:
        fms = platform
        td.set(pos, with_reg(v, 0, platform), "F/M/S 0 means the native F/M/S", override=True,
               written=(0x0FFF3FFF, 0, 0, 0))
        checked = td.tables.variant.fms_check_native_substitute
    if checked:
        if td.attr(ATTR_MIGRATABLE):
            if not check_fms_config(td.tables, platform, fms):
                return cpuid_refusal(e, "check_fms_config", "src/common/helpers/cpuid_fms.c: "
                                     "check_fms_config", register="eax", mask=fms)
        elif fms != platform:
            return cpuid_refusal(e, "fms_native", f"{MNG_INIT}: read_and_set_cpuid_configurations"
                                 " (non-migratable F/M/S must be native)", register="eax",
                                 mask=fms ^ platform)
    if not td.xfam >> 2 & 1:
        mask = td.tables.xfam_mask("xfam_mask_0x1_0xffffffff", 2)[2]
        v = td.values[pos]
        td.set(pos, with_reg(v, 2, v[2] & ~mask), "XFAM[2] (AVX) is 0: xfam_mask_0x1 ECX")
    td.flags["monitor"] = bool(td.values[pos][2] >> 3 & 1)
    return None


# ---------------------------------------------------------------------------
# Leaf 7.

def leaf_7_0(td: Td, pos: int, e: LookupEntry) -> Refusal | None:
    xfam_masked(td, pos, "xfam_mask_0x7_0x0")
    ebx = td.values[pos][1]
    hle, rtm = bool(ebx >> 4 & 1), bool(ebx >> 11 & 1)
    if hle != rtm:
        return cpuid_refusal(e, "tsx_hle_rtm", f"{MNG_INIT}: read_and_set_cpuid_configurations "
                             "(HLE and RTM must be equal on final values)",
                             rcx=td.tables.variant.tsx_mismatch_sets_rcx, register="ebx",
                             mask=(1 << 4) | (1 << 11))
    if hle and not td.host.tsx_ctrl:
        return Refusal(st.with_operand(st.TDX_INCORRECT_MSR_VALUE,
                                       st.IA32_ARCH_CAPABILITIES_MSR_ADDR),
                       "tsx_ctrl", f"{MNG_INIT}: read_and_set_cpuid_configurations (virtual TSX "
                       "needs IA32_ARCH_CAPABILITIES.TSX_CTRL)", 0, e.leaf, e.subleaf, "ebx",
                       (1 << 4) | (1 << 11))
    v = with_bit(td.values[pos], 2, 31, td.attr(ATTR_PKS))
    td.set(pos, v, "ECX.PKS (bit 31) = ATTRIBUTES.PKS", override=True, written=(0, 0, 1 << 31, 0))
    td.set(pos, with_bit(td.values[pos], 2, 23, False), "ECX.KL (bit 23) forced to 0",
           override=True, written=(0, 0, 1 << 23, 0))
    td.flags["la57"] = bool(td.values[pos][2] >> 16 & 1)
    return None


def leaf_7_1(td: Td, pos: int, e: LookupEntry) -> Refusal | None:
    xfam_masked(td, pos, "xfam_mask_0x7_0x1")
    td.flags["perfmon_ext"] = bool(td.values[pos][0] >> 8 & 1)
    if td.tables.variant.lass_from_attributes:
        td.set(pos, with_bit(td.values[pos], 0, 6, td.attr(ATTR_LASS)),
               "EAX.LASS (bit 6) = ATTRIBUTES.LASS", override=True, written=(1 << 6, 0, 0, 0))
    return None


# ---------------------------------------------------------------------------
# Leaf 0xD.

def leaf_d(td: Td, pos: int, e: LookupEntry) -> Refusal | None:
    sub = e.subleaf or 0
    if sub == 0:
        xfam_masked(td, pos, "xfam_mask_0xd_0x0")
        size = td.host.xsave_size(td.xfam & td.tables.const("XCR0_USER_BIT_MASK"))
        td.set(pos, with_reg(td.values[pos], 2, size), "ECX = XSAVE size of XFAM's user bits",
               override=True, written=(0, 0, 0xFFFFFFFF, 0))
    elif sub == 1:
        xfam_masked(td, pos, "xfam_mask_0xd_0x1")
        if not td.host.xfd_faulting_mask(td.tables) & td.xfam:
            td.set(pos, with_bit(td.values[pos], 0, 4, False),
                   "EAX.XFD (bit 4): no XFAM component supports XFD")
    elif sub <= td.tables.const("XCR0_MAX_VALID_BIT"):
        zero_unless(td, pos, bool(td.xfam >> sub & 1), f"XFAM[{sub}] is 0")
    return None


# ---------------------------------------------------------------------------
# Leaves zeroed or rewritten as a whole.

def leaf_23(td: Td, pos: int, e: LookupEntry) -> Refusal | None:
    mode = td.tables.variant.leaf_23
    if mode == "native":
        return None
    if not td.attr(ATTR_PERFMON) or not td.flags.get("perfmon_ext", False):
        td.set(pos, ZERO, "ATTRIBUTES.PERFMON and 7.1 EAX[8] both needed")
    elif mode == "perfmon_subleaves":
        if e.subleaf == 0:
            td.bitmap_23 = td.values[pos][0]
        else:
            zero_unless(td, pos, bool(td.bitmap_23 >> (e.subleaf or 0) & 1),
                        "sub-leaf not enumerated in 0x23.0 EAX")
    return None


def leaf_80000008(td: Td, pos: int, e: LookupEntry) -> Refusal | None:
    la = td.tables.const("LA57_LINEAR_ADDRESS_WIDTH" if td.flags.get("la57")
                         else "LEGACY_LINEAR_ADDRESS_WIDTH")
    eax = (td.values[pos][0] & ~0xFF00) | la << 8
    td.set(pos, with_reg(td.values[pos], 0, eax), "EAX.LA_BITS from the TD's LA57",
           override=True, written=(0xFF00, 0, 0, 0))
    if not td.tables.variant.maxpa_0x80000008:
        return None
    gpaw = bool(td.config_flags >> FLAG_GPAW & 1)
    limit = min(td.host.max_pa, 52 if gpaw else td.tables.const("MAX_PA_FOR_GPA_NOT_WIDE"))
    pa, gpa = td.host.max_pa, 0
    if td.config_flags >> FLAG_MAXGPA_VIRT & 1:
        gpa = limit
    elif td.config_flags >> FLAG_MAXPA_VIRT & 1:
        if eax & 0xFF:
            raise Unmodelled("MAXPA_VIRT with a non-zero PA width: is_virt_maxpa_valid "
                             "was not read from the module source")
        pa = limit
    eax = (eax & ~0xFF00FF) | gpa << 16 | pa
    td.set(pos, with_reg(td.values[pos], 0, eax), "EAX.PA_BITS/GPA_BITS from the platform "
           "and CONFIG_FLAGS", override=True, written=(0xFF00FF, 0, 0, 0))
    return None


def simple_leaf(td: Td, pos: int, e: LookupEntry) -> Refusal | None:
    """Leaves 5, 0xA, 0x14, 0x15, 0x19, 0x1A, 0x1C, 0x1D."""
    x = td.xfam
    if e.leaf == 5:
        zero_unless(td, pos, td.flags.get("monitor", False), "leaf 1 ECX.MONITOR is 0")
    elif e.leaf == 0xA:
        zero_unless(td, pos, td.attr(ATTR_PERFMON), "ATTRIBUTES.PERFMON is 0")
    elif e.leaf == 0x14:
        zero_unless(td, pos, bool(x >> 8 & 1), "XFAM[8] (PT) is 0")
    elif e.leaf == 0x15:
        td.set(pos, with_reg(td.values[pos], 1, td.tsc_frequency),
               "EBX = TD_PARAMS.TSC_FREQUENCY", override=True, written=(0, 0xFFFFFFFF, 0, 0))
    elif e.leaf == 0x19:
        td.set(pos, ZERO, "Key Locker leaf zeroed")
    elif e.leaf == 0x1A and td.tables.variant.leaf_1a_zero_migratable:
        zero_unless(td, pos, not td.attr(ATTR_MIGRATABLE), "MIGRATABLE TD")
    elif e.leaf == 0x1C:
        zero_unless(td, pos, bool(x >> 15 & 1), "XFAM[15] (LBR) is 0")
    elif e.leaf == 0x1D:
        zero_unless(td, pos, bool(x >> 17 & x >> 18 & 1), "XFAM[18:17] (AMX) not both 1")
    return None


Rule = Callable[[Td, int, LookupEntry], "Refusal | None"]

# The leaf rules that can refuse.  Each reads only its own entry's value (after the row's
# configuration), the TD's attributes and XFAM and the host, never what an earlier rule
# left: the compiled mirror (kvmtdx.model.compiled) runs these alone, remembered on those
# inputs, and takes every other rule for one that never refuses.  A rule that refuses
# belongs here (tests/test_compiled.py reads the rules' source to hold this list to it).
REFUSING_RULES: tuple[Rule, ...] = (leaf_1, leaf_7_0)


def rule_for(e: LookupEntry) -> Rule | None:
    if e.leaf == 1:
        return leaf_1
    if e.leaf == 7:
        return {0: leaf_7_0, 1: leaf_7_1}.get(e.subleaf or 0)
    if e.leaf == 0xD:
        return leaf_d
    if e.leaf == 0x23:
        return leaf_23
    if e.leaf == 0x80000008:
        return leaf_80000008
    if e.leaf in (5, 0xA, 0x14, 0x15, 0x19, 0x1A, 0x1C, 0x1D):
        return simple_leaf
    return None


@per_object
def active_entries(tables: ModuleTables) -> tuple[tuple[int, LookupEntry, Rule | None], ...]:
    """The lookup entries the pass can change, in processing order, with their leaf rule:
    every other entry keeps its sampled native value."""
    return tuple((pos, e, rule_for(e)) for pos, e in enumerate(tables.lookup)
                 if e.config_index is not None or rule_for(e) is not None)


def cpuid_pass(td: Td) -> Refusal | None:
    """Every lookup entry in array order: row value, then its leaf's own rule."""
    td.values = list(td.native)
    for pos, e, rule in active_entries(td.tables):
        refusal = configured_row(td, pos, e)
        if refusal is None and rule is not None:
            refusal = rule(td, pos, e)
        if refusal is not None:
            return refusal
    return None

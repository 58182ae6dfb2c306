"""TDH.MNG.INIT's CPUID part in the simulated TDX module: every cpuid_lookup entry in array
order, then the leaf 0x1F topology (tdh_mng_init.c read_and_set_cpuid_configurations,
helpers.c check_cpuid_1f / check_cpuid_1f_and_compute_cpuid_0b).

The sim's own reading of intel/tdx-module; see `tdx_platform` for the sources.  A
refusal is raised as `Refusal(status, rcx)` from the entry being processed, so the
first entry in lookup order that fails decides, as in the module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmtdx.model.tdx_module_tables import ModuleTables
from kvmtdx.sim.tdx_platform import ZERO, Generation, Platform, Regs, xsave_area_size
from kvmtdx.status import Operand, TdxStatus

# Completion statuses and operand ids: the project's one table (kvmtdx.status).
TDX_OPERAND_INVALID = int(TdxStatus.TDX_OPERAND_INVALID)
TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED = int(TdxStatus.TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)
TDX_INCORRECT_MSR_VALUE = int(TdxStatus.TDX_INCORRECT_MSR_VALUE)
OPERAND_CPUID_CONFIG = int(Operand.CPUID_CONFIG)
IA32_ARCH_CAPABILITIES_MSR = 0x10A  # src/common/x86_defs/msr_defs.h
NO_SUBLEAF = 0xFFFFFFFF

# TD ATTRIBUTES bits (include/tdx_api_defs.h td_param_attributes_t).
ATTR_LASS = 1 << 27
ATTR_MIGRATABLE = 1 << 29
ATTR_PKS = 1 << 30
ATTR_PERFMON = 1 << 63
# TD_PARAMS.CONFIG_FLAGS bits.
FLAG_GPAW = 1 << 0
FLAG_MAXPA_VIRT = 1 << 3
FLAG_MAXGPA_VIRT = 1 << 4
# Topology level types (x86_defs.h cpuid_topology_level_type_e).
LEVEL_SMT, LEVEL_CORE = 1, 2

Handler = Callable[["Td", "int | None", Regs], Regs]


class Refusal(Exception):
    """TDH.MNG.INIT stops with `status`; `rcx` is its extended error information."""

    def __init__(self, status: int, rcx: int = 0) -> None:
        super().__init__(f"0x{status:016x} rcx 0x{rcx:x}")
        self.status = status
        self.rcx = rcx


class Unmodelled(Exception):
    """A module path the sim has not read, so it gives no answer rather than a guessed one."""


def rcx_of(leaf: int, subleaf: int | None) -> int:
    """The extended error information naming a CPUID leaf: leaf | sub-leaf << 32."""
    return leaf | (NO_SUBLEAF if subleaf is None else subleaf) << 32


@dataclass(slots=True)
class Td:
    """One TDH.MNG.INIT in progress: its inputs and the CPUID flags it gathers on the way."""

    attributes: int
    xfam: int
    config_flags: int
    tsc_frequency: int
    config_values: tuple[Regs, ...]  # TD_PARAMS.CPUID_CONFIG_VALUES, per configurable row
    values: list[int]  # TDCS CPUID_VALUES per lookup entry, packed (see `pack`)
    monitor: bool = False
    la57: bool = False
    perfmon_ext: bool = False
    leaf_23_bitmap: int = 0


def pack(r: Regs) -> int:
    """Four registers as one 128-bit word, EAX lowest: one integer operation per row."""
    return r[0] | r[1] << 32 | r[2] << 64 | r[3] << 96


def unpack(v: int) -> Regs:
    return (v & _U32, v >> 32 & _U32, v >> 64 & _U32, v >> 96)


_U32 = 0xFFFFFFFF
_U128 = (1 << 128) - 1


@dataclass(frozen=True, slots=True)
class _Entry:
    """One cpuid_lookup entry, with its row's masks packed, looked up once."""

    index: int
    leaf: int
    subleaf: int | None
    row: int | None  # config_index
    allowed: int  # config_direct | allow_direct
    base: int  # the native value, FIXED0/DYNAMIC cleared, FIXED1 set, config_direct cleared
    config_direct: int
    keep: int  # ~allow_direct: bits a 0 in the request does not clear
    handler: Handler | None


def _masked(v: Regs, masks: dict[int, Regs], xfam: int) -> Regs:
    """apply_cpuid_xfam_masks: each XFAM bit that is 0 clears its mask's bits."""
    a, b, c, d = v
    for bit, (ma, mb, mc, md) in masks.items():
        if not xfam >> bit & 1:
            a, b, c, d = a & ~ma, b & ~mb, c & ~mc, d & ~md
    return (a, b, c, d)


def _set_bit(value: int, n: int, on: bool) -> int:
    return value | 1 << n if on else value & ~(1 << n)


def _zero(td: Td, sub: int | None, v: Regs) -> Regs:
    return ZERO


# Leaves whose rule reads only ATTRIBUTES, XFAM, TSC_FREQUENCY and the platform, never a
# flag an earlier entry set: without a CPUID_CONFIG row they come out the same for the same
# three inputs, so they are worked out once per combination (KVM sends few).
_PARAMS_ONLY = frozenset({0xA, 0xD, 0x14, 0x15, 0x19, 0x1A, 0x1C, 0x1D})
_STATIC_CACHE_SIZE = 64


class CpuidProcessor:
    """read_and_set_cpuid_configurations of one module on one platform; built once."""

    def __init__(self, tables: ModuleTables, gen: Generation, platform: Platform) -> None:
        self.name = tables.name
        self.gen = gen
        self.platform = platform
        self.masks = {name: dict(t) for name, t in tables.xfam_masks.items()}
        self.user_mask = tables.const("XCR0_USER_BIT_MASK")
        self.la57_bits = tables.const("LA57_LINEAR_ADDRESS_WIDTH")
        self.legacy_la_bits = tables.const("LEGACY_LINEAR_ADDRESS_WIDTH")
        self.gpa_not_wide = tables.const("MAX_PA_FOR_GPA_NOT_WIDE")
        self.level_type_max = tables.const("LEVEL_TYPE_MAX")
        handlers: dict[int, Handler] = {
            1: self._leaf_1, 5: self._leaf_5, 7: self._leaf_7, 0xA: self._leaf_a,
            0xD: self._leaf_d, 0x14: self._leaf_14, 0x15: self._leaf_15, 0x19: _zero,
            0x1C: self._leaf_1c, 0x1D: self._leaf_1d, 0x80000008: self._leaf_80000008}
        if gen.perfmon_ext:
            handlers[0x1A] = self._leaf_1a
            handlers[0x23] = self._leaf_23
        self.keys = tuple(e.key for e in tables.lookup)
        self.native = tuple(pack(v) for v in platform.native)
        # 7.2 has no rule: its value is only read for flags the module keeps for itself.
        entries = [self._entry(tables, i, None if e.key == (7, 2) else handlers.get(e.leaf))
                   for i, e in enumerate(tables.lookup)]
        # Entries that can refuse or read what an earlier one found, in lookup order; the
        # rest only ever depend on (attributes, xfam, tsc_frequency).
        self.dynamic = tuple(e for e in entries if e.row is not None or (
            e.handler is not None and e.leaf not in _PARAMS_ONLY))
        self.static = tuple(e for e in entries if e not in self.dynamic and e.handler)
        self._static_values: dict[tuple[int, int, int], tuple[int, ...]] = {}
        self.faulting = frozenset(
            e.key for e in tables.lookup if e.faulting and gen.faulting_leaves)
        self.topology_rows = tuple(self.lookup_index(0x1F, s) for s in range(
            self.level_type_max)) if gen.topology else ()
        self.leaf_0b = tuple(self.lookup_index(0xB, n) for n in range(3)) if gen.topology else ()

    def _entry(self, tables: ModuleTables, i: int, handler: Handler | None) -> _Entry:
        e = tables.lookup[i]
        row = None if e.config_index is None else tables.configurable[e.config_index]
        cd = 0 if row is None else pack(row.config_direct)
        ad = 0 if row is None else pack(row.allow_direct)
        fixed = (self.native[i] & ~pack(e.fixed0_or_dynamic)) | pack(e.fixed1)
        return _Entry(index=i, leaf=e.leaf, subleaf=e.subleaf, row=e.config_index,
                      allowed=cd | ad, base=fixed & ~cd, config_direct=cd,
                      keep=~ad & _U128, handler=handler)

    def lookup_index(self, leaf: int, subleaf: int) -> int:
        """get_cpuid_lookup_entry: the first entry of the leaf for that (or any) sub-leaf."""
        for i, (lf, sub) in enumerate(self.keys):
            if lf == leaf and (sub is None or sub == subleaf):
                return i
        raise Unmodelled(f"TDX module {self.name} has no CPUID 0x{leaf:x}.{subleaf}")

    def run(self, td: Td) -> None:
        """Every lookup entry into td.values (lookup order decides between refusals), then
        the topology; raises Refusal."""
        values = td.values = list(self._static_part(td))
        config = td.config_values
        for e in self.dynamic:
            if e.row is None:
                v = self.native[e.index]
            else:
                a, b, c, d = config[e.row]
                cfg = a | b << 32 | c << 64 | d << 96  # pack(), inline: this loop is hot
                if cfg & ~e.allowed:
                    raise Refusal(TDX_OPERAND_INVALID + OPERAND_CPUID_CONFIG,
                                  rcx_of(e.leaf, e.subleaf))
                # CONFIG_DIRECT bits from the request; ALLOW_DIRECT bits kept only if asked.
                v = (e.base | cfg & e.config_direct) & (cfg | e.keep)
            if e.handler is not None:
                v = pack(e.handler(td, e.subleaf, unpack(v)))
            values[e.index] = v
        if self.gen.topology:
            self._topology(td)

    def _static_part(self, td: Td) -> tuple[int, ...]:
        key = (td.attributes, td.xfam, td.tsc_frequency)
        cached = self._static_values.get(key)
        if cached is None:
            values = list(self.native)
            for e in self.static:
                assert e.handler is not None
                values[e.index] = pack(e.handler(td, e.subleaf, unpack(self.native[e.index])))
            if len(self._static_values) >= _STATIC_CACHE_SIZE:
                self._static_values.clear()
            cached = self._static_values[key] = tuple(values)
        return cached

    # ------------------------------------------------------------------
    # The leaf rules: each returns the entry's value, or raises Refusal.

    def _leaf_1(self, td: Td, sub: int | None, v: Regs) -> Regs:
        a, b, c, d = v
        fms = a
        check = True
        if fms == 0:
            # 0 asks for the platform's F/M/S; 2.0 takes it as is, 1.5.x still checks it.
            fms = a = self.platform.fms
            check = self.gen.fms_zero_checked
        if check and not self._fms_allowed(fms, td.attributes):
            raise Refusal(TDX_OPERAND_INVALID + OPERAND_CPUID_CONFIG, rcx_of(1, sub))
        if not td.xfam >> 2 & 1:
            c &= ~self.masks.get("xfam_mask_0x1_0xffffffff", {}).get(2, ZERO)[2]
        td.monitor = bool(c >> 3 & 1)
        return (a, b, c, d)

    def _fms_allowed(self, fms: int, attributes: int) -> bool:
        if attributes & ATTR_MIGRATABLE:
            return self.platform.fms_allowed(fms)
        return fms == self.platform.fms

    def _leaf_5(self, td: Td, sub: int | None, v: Regs) -> Regs:
        return v if td.monitor else ZERO

    def _leaf_7(self, td: Td, sub: int | None, v: Regs) -> Regs:
        if sub == 0:
            a, b, c, d = _masked(v, self.masks.get("xfam_mask_0x7_0x0", {}), td.xfam)
            hle, rtm = b >> 4 & 1, b >> 11 & 1
            if hle != rtm:
                raise Refusal(TDX_OPERAND_INVALID + OPERAND_CPUID_CONFIG,
                              rcx_of(7, 0) if self.gen.tsx_mismatch_rcx else 0)
            if hle and not self.platform.tsx_ctrl:
                raise Refusal(TDX_INCORRECT_MSR_VALUE + IA32_ARCH_CAPABILITIES_MSR)
            c = _set_bit(c, 31, bool(td.attributes & ATTR_PKS))  # PKS reflects ATTRIBUTES.PKS
            c = _set_bit(c, 23, False)  # KL_SUPPORTED: no Key Locker in a TD
            td.la57 = bool(c >> 16 & 1)
            return (a, b, c, d)
        if sub == 1:
            a, b, c, d = _masked(v, self.masks.get("xfam_mask_0x7_0x1", {}), td.xfam)
            if self.gen.perfmon_ext:
                td.perfmon_ext = bool(a >> 8 & 1)
                a = _set_bit(a, 6, bool(td.attributes & ATTR_LASS))
            return (a, b, c, d)
        return v

    def _leaf_a(self, td: Td, sub: int | None, v: Regs) -> Regs:
        return v if td.attributes & ATTR_PERFMON else ZERO

    def _leaf_d(self, td: Td, sub: int | None, v: Regs) -> Regs:
        if sub == 0:
            a, b, _, d = _masked(v, self.masks.get("xfam_mask_0xd_0x0", {}), td.xfam)
            return (a, b, xsave_area_size(self.platform, td.xfam & self.user_mask), d)
        if sub == 1:
            a, b, c, d = _masked(v, self.masks.get("xfam_mask_0xd_0x1", {}), td.xfam)
            if not self.platform.xfd_faulting_mask & td.xfam:
                a = _set_bit(a, 4, False)  # XFD
            return (a, b, c, d)
        if sub is not None and sub < len(self.platform.xsave_ends):
            return v if td.xfam >> sub & 1 else ZERO
        return v

    def _leaf_14(self, td: Td, sub: int | None, v: Regs) -> Regs:
        return v if td.xfam >> 8 & 1 else ZERO  # PT

    def _leaf_15(self, td: Td, sub: int | None, v: Regs) -> Regs:
        return (v[0], td.tsc_frequency, v[2], v[3])

    def _leaf_1c(self, td: Td, sub: int | None, v: Regs) -> Regs:
        return v if td.xfam >> 15 & 1 else ZERO  # LBR

    def _leaf_1d(self, td: Td, sub: int | None, v: Regs) -> Regs:
        return v if td.xfam >> 17 & 1 and td.xfam >> 18 & 1 else ZERO  # AMX

    def _leaf_1a(self, td: Td, sub: int | None, v: Regs) -> Regs:
        return ZERO if td.attributes & ATTR_MIGRATABLE else v

    def _leaf_23(self, td: Td, sub: int | None, v: Regs) -> Regs:
        if not td.attributes & ATTR_PERFMON or not td.perfmon_ext:
            return ZERO
        if not self.gen.leaf_23_bitmap:
            return v
        if sub == 0:
            td.leaf_23_bitmap = v[0]
            return v
        return v if sub is not None and td.leaf_23_bitmap >> sub & 1 else ZERO

    def _leaf_80000008(self, td: Td, sub: int | None, v: Regs) -> Regs:
        a, b, c, d = v
        la = self.la57_bits if td.la57 else self.legacy_la_bits
        a = (a & ~0xFF00) | la << 8
        if self.gen.maxpa_flags:
            a = self._address_widths(td, a)
        return (a, b, c, d)

    def _address_widths(self, td: Td, a: int) -> int:
        """2.0: PA bits [7:0] and GPA bits [23:16] under MAXPA_VIRT / MAXGPA_VIRT."""
        max_pa = self.platform.max_pa
        wide = 52 if td.config_flags & FLAG_GPAW else self.gpa_not_wide
        pa, gpa = a & 0xFF, 0
        if td.config_flags & FLAG_MAXGPA_VIRT:
            pa, gpa = max_pa, min(max_pa, wide)
        elif td.config_flags & FLAG_MAXPA_VIRT:
            if pa:
                # is_virt_maxpa_valid(): its body is not among the sources read.
                raise Unmodelled("MAXPA_VIRT with a configured PA width (is_virt_maxpa_valid)")
            pa = min(max_pa, wide)
        else:
            pa = max_pa
        return (a & ~0xFF00FF) | gpa << 16 | pa

    # ------------------------------------------------------------------
    # Leaf 0x1F and the 0xB derived from it.

    def _topology(self, td: Td) -> None:
        """check_cpuid_1f (1.5.05) / check_cpuid_1f_and_compute_cpuid_0b (2.0)."""
        null = False
        core_seen = False
        level_type = 0
        last = ZERO
        smt = False
        for s, i in enumerate(self.topology_rows):
            v = unpack(td.values[i])
            if s == 0:
                null = v == ZERO  # all zero: take the hardware's topology
            elif null and v != ZERO:
                raise Refusal(TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)
            if null:
                td.values[i] = self.native[i]
                v = unpack(self.native[i])
            prev, level_type = level_type, v[2] >> 8 & 0xFF
            if level_type:
                if level_type <= prev or level_type >= self.level_type_max:
                    raise Refusal(TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)
                if self.gen.topology == 2 and (v[2] & 0xFF != s or (
                        level_type == LEVEL_SMT and s != 0)):
                    raise Refusal(TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)
                if level_type == LEVEL_SMT:
                    td.values[self.leaf_0b[0]] = pack(v)
                    smt = True
                elif level_type == LEVEL_CORE:
                    core_seen = True
                last = v
            elif s == 0 or not core_seen:
                raise Refusal(TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)
            if self.gen.topology == 1:
                # 1.5.05 writes 0xB.1 on every pass: the last sub-leaf scanned wins.
                td.values[self.leaf_0b[1]] = pack(
                    (v[0], v[1], (v[2] & ~0xFF00) | LEVEL_CORE << 8, v[3]))
        if self.gen.topology == 2:
            self._derive_0b(td, last, 1 if smt else 0)

    def _derive_0b(self, td: Td, last: Regs, level: int) -> None:
        """2.0: 0xB.level is the last valid 0x1F level as CORE, then empty levels up to 2."""
        td.values[self.leaf_0b[level]] = pack(
            (last[0], last[1], level | LEVEL_CORE << 8, last[3]))
        for n in range(level + 1, 3):
            td.values[self.leaf_0b[n]] = pack((0, 0, n, last[3]))

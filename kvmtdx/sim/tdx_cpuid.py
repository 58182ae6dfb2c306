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

# A leaf rule: the entry's packed value in (see `pack`), the value the TD gets out.
Handler = Callable[["Td", "int | None", int], int]


class Refusal(Exception):
    """TDH.MNG.INIT stops with `status`; `rcx` is its extended error information."""

    def __init__(self, status: int, rcx: int = 0) -> None:
        super().__init__(status, rcx)
        self.status = status
        self.rcx = rcx

    def __str__(self) -> str:
        # Worked out when shown: most refusals are caught and never shown.
        return f"0x{self.status:016x} rcx 0x{self.rcx:x}"


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


def _set_bit(value: int, n: int, on: bool) -> int:
    return value | 1 << n if on else value & ~(1 << n)


def _with_reg(v: int, reg: int, value: int) -> int:
    """A packed value with register `reg` (0 = EAX) replaced."""
    return v & ~(_U32 << 32 * reg) | value << 32 * reg


def _zero(td: Td, sub: int | None, v: int) -> int:
    return 0


# Bit positions in a packed value.
_EBX, _ECX = 32, 64


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
        self.masks = {name: {bit: pack(m) for bit, m in t.items()}
                      for name, t in tables.xfam_masks.items()}
        self._kept: dict[tuple[str, int], int] = {}
        # The topology check's writes (or refusal status) per 0x1F values.
        self._topologies: dict[tuple[int, ...], tuple[tuple[int, int], ...] | int] = {}
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
        self.dynamic_fields = tuple((e.index, e.row, ~e.allowed & _U128, e.base, e.config_direct,
                                     e.keep, e.handler, e) for e in self.dynamic)
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
        native = self.native
        # The entries' fields as plain tuples: this loop is hot.
        for index, row, refused, base, config_direct, keep, handler, e in self.dynamic_fields:
            if row is None:
                v = native[index]
            elif (regs := config[row]) == ZERO:
                v = base & keep  # nothing asked: CONFIG_DIRECT bits 0, ALLOW_DIRECT bits cleared
            else:
                a, b, c, d = regs
                cfg = a | b << 32 | c << 64 | d << 96  # pack(), inline
                if cfg & refused:
                    raise Refusal(TDX_OPERAND_INVALID + OPERAND_CPUID_CONFIG,
                                  rcx_of(e.leaf, e.subleaf))
                # CONFIG_DIRECT bits from the request; ALLOW_DIRECT bits kept only if asked.
                v = (base | cfg & config_direct) & (cfg | keep)
            if handler is not None:
                v = handler(td, e.subleaf, v)
            values[index] = v
        if self.gen.topology:
            self._topology(td)

    def _static_part(self, td: Td) -> tuple[int, ...]:
        key = (td.attributes, td.xfam, td.tsc_frequency)
        cached = self._static_values.get(key)
        if cached is None:
            values = list(self.native)
            for e in self.static:
                assert e.handler is not None
                values[e.index] = e.handler(td, e.subleaf, self.native[e.index])
            if len(self._static_values) >= _STATIC_CACHE_SIZE:
                self._static_values.clear()
            cached = self._static_values[key] = tuple(values)
        return cached

    # ------------------------------------------------------------------
    # The leaf rules: each takes the entry's packed value and returns the TD's, or raises
    # Refusal.

    def _masked(self, v: int, table: str, xfam: int) -> int:
        """apply_cpuid_xfam_masks: each XFAM bit that is 0 clears its mask's bits."""
        kept = self._kept.get((table, xfam))
        if kept is None:
            cleared = 0
            for bit, mask in self.masks.get(table, {}).items():
                if not xfam >> bit & 1:
                    cleared |= mask
            if len(self._kept) >= _STATIC_CACHE_SIZE:
                self._kept.clear()
            kept = self._kept[table, xfam] = ~cleared & _U128
        return v & kept

    def _leaf_1(self, td: Td, sub: int | None, v: int) -> int:
        fms = v & _U32
        check = True
        if fms == 0:
            # 0 asks for the platform's F/M/S; 2.0 takes it as is, 1.5.x still checks it.
            fms = self.platform.fms
            v |= fms
            check = self.gen.fms_zero_checked
        if check and not self._fms_allowed(fms, td.attributes):
            raise Refusal(TDX_OPERAND_INVALID + OPERAND_CPUID_CONFIG, rcx_of(1, sub))
        if not td.xfam >> 2 & 1:
            v &= ~(self.masks.get("xfam_mask_0x1_0xffffffff", {}).get(2, 0) & _U32 << _ECX)
        td.monitor = bool(v >> _ECX + 3 & 1)
        return v

    def _fms_allowed(self, fms: int, attributes: int) -> bool:
        if attributes & ATTR_MIGRATABLE:
            return self.platform.fms_allowed(fms)
        return fms == self.platform.fms

    def _leaf_5(self, td: Td, sub: int | None, v: int) -> int:
        return v if td.monitor else 0

    def _leaf_7(self, td: Td, sub: int | None, v: int) -> int:
        if sub == 0:
            v = self._masked(v, "xfam_mask_0x7_0x0", td.xfam)
            hle, rtm = v >> _EBX + 4 & 1, v >> _EBX + 11 & 1
            if hle != rtm:
                raise Refusal(TDX_OPERAND_INVALID + OPERAND_CPUID_CONFIG,
                              rcx_of(7, 0) if self.gen.tsx_mismatch_rcx else 0)
            if hle and not self.platform.tsx_ctrl:
                raise Refusal(TDX_INCORRECT_MSR_VALUE + IA32_ARCH_CAPABILITIES_MSR)
            # PKS reflects ATTRIBUTES.PKS; KL_SUPPORTED: no Key Locker in a TD.
            v = _set_bit(v, _ECX + 31, bool(td.attributes & ATTR_PKS)) & ~(1 << _ECX + 23)
            td.la57 = bool(v >> _ECX + 16 & 1)
            return v
        if sub == 1:
            v = self._masked(v, "xfam_mask_0x7_0x1", td.xfam)
            if self.gen.perfmon_ext:
                td.perfmon_ext = bool(v >> 8 & 1)
                v = _set_bit(v, 6, bool(td.attributes & ATTR_LASS))
            return v
        return v

    def _leaf_a(self, td: Td, sub: int | None, v: int) -> int:
        return v if td.attributes & ATTR_PERFMON else 0

    def _leaf_d(self, td: Td, sub: int | None, v: int) -> int:
        if sub == 0:
            v = self._masked(v, "xfam_mask_0xd_0x0", td.xfam)
            size = xsave_area_size(self.platform, td.xfam & self.user_mask)
            return _with_reg(v, 2, size)
        if sub == 1:
            v = self._masked(v, "xfam_mask_0xd_0x1", td.xfam)
            if not self.platform.xfd_faulting_mask & td.xfam:
                v &= ~(1 << 4)  # XFD
            return v
        if sub is not None and sub < len(self.platform.xsave_ends):
            return v if td.xfam >> sub & 1 else 0
        return v

    def _leaf_14(self, td: Td, sub: int | None, v: int) -> int:
        return v if td.xfam >> 8 & 1 else 0  # PT

    def _leaf_15(self, td: Td, sub: int | None, v: int) -> int:
        return _with_reg(v, 1, td.tsc_frequency)

    def _leaf_1c(self, td: Td, sub: int | None, v: int) -> int:
        return v if td.xfam >> 15 & 1 else 0  # LBR

    def _leaf_1d(self, td: Td, sub: int | None, v: int) -> int:
        return v if td.xfam >> 17 & 1 and td.xfam >> 18 & 1 else 0  # AMX

    def _leaf_1a(self, td: Td, sub: int | None, v: int) -> int:
        return 0 if td.attributes & ATTR_MIGRATABLE else v

    def _leaf_23(self, td: Td, sub: int | None, v: int) -> int:
        if not td.attributes & ATTR_PERFMON or not td.perfmon_ext:
            return 0
        if not self.gen.leaf_23_bitmap:
            return v
        if sub == 0:
            td.leaf_23_bitmap = v & _U32
            return v
        return v if sub is not None and td.leaf_23_bitmap >> sub & 1 else 0

    def _leaf_80000008(self, td: Td, sub: int | None, v: int) -> int:
        la = self.la57_bits if td.la57 else self.legacy_la_bits
        a = (v & _U32 & ~0xFF00) | la << 8
        if self.gen.maxpa_flags:
            a = self._address_widths(td, a)
        return _with_reg(v, 0, a)

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
        """check_cpuid_1f (1.5.05) / check_cpuid_1f_and_compute_cpuid_0b (2.0): it reads the
        0x1F values alone, so what it writes (or its refusal) is remembered on them."""
        found = tuple([td.values[i] for i in self.topology_rows])
        done = self._topologies.get(found)
        if done is None:
            try:
                done = tuple(self._topology_of(found).items())
            except Refusal as r:
                done = r.status
            if len(self._topologies) >= _STATIC_CACHE_SIZE:
                self._topologies.clear()
            self._topologies[found] = done
        if isinstance(done, int):
            raise Refusal(done)
        for i, v in done:
            td.values[i] = v

    def _topology_of(self, found: tuple[int, ...]) -> dict[int, int]:
        """The values the topology check writes, by lookup index, for these 0x1F values."""
        out: dict[int, int] = {}
        null = False
        core_seen = False
        level_type = 0
        last = ZERO
        smt = False
        for s, i in enumerate(self.topology_rows):
            v = unpack(found[s])
            if s == 0:
                null = v == ZERO  # all zero: take the hardware's topology
            elif null and v != ZERO:
                raise Refusal(TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)
            if null:
                out[i] = self.native[i]
                v = unpack(self.native[i])
            prev, level_type = level_type, v[2] >> 8 & 0xFF
            if level_type:
                if level_type <= prev or level_type >= self.level_type_max:
                    raise Refusal(TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)
                if self.gen.topology == 2 and (v[2] & 0xFF != s or (
                        level_type == LEVEL_SMT and s != 0)):
                    raise Refusal(TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)
                if level_type == LEVEL_SMT:
                    out[self.leaf_0b[0]] = pack(v)
                    smt = True
                elif level_type == LEVEL_CORE:
                    core_seen = True
                last = v
            elif s == 0 or not core_seen:
                raise Refusal(TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)
            if self.gen.topology == 1:
                # 1.5.05 writes 0xB.1 on every pass: the last sub-leaf scanned wins.
                out[self.leaf_0b[1]] = pack(
                    (v[0], v[1], (v[2] & ~0xFF00) | LEVEL_CORE << 8, v[3]))
        if self.gen.topology == 2:
            self._derive_0b(out, last, 1 if smt else 0)
        return out

    def _derive_0b(self, out: dict[int, int], last: Regs, level: int) -> None:
        """2.0: 0xB.level is the last valid 0x1F level as CORE, then empty levels up to 2."""
        out[self.leaf_0b[level]] = pack(
            (last[0], last[1], level | LEVEL_CORE << 8, last[3]))
        for n in range(level + 1, 3):
            out[self.leaf_0b[n]] = pack((0, 0, n, last[3]))

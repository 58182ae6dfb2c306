"""The simulated host's own TDX module: what it reports to KVM, and TDH.MNG.INIT.

Built from the module's converted tables (`kvmtdx.model.tdx_module_tables`, data
only) on one host: `tdx_platform` does TDH.SYS.INIT / TDH.SYS.CONFIG, this file the
TD configuration checks of TDH.MNG.INIT (tdh_mng_init.c read_and_set_td_configurations,
helpers.c verify_td_attributes, check_xfam, verify_td_config_flags,
verify_and_set_td_eptp_controls) and `tdx_cpuid` its CPUID part.  KVM sees the module
only through what it reports (`TdConf`: the kernel's tdx_sys_info_td_conf plus the
CPUID_CONFIG rows) and through the status TDH.MNG.INIT returns.

What KVM 7.3 always zeroes in TD_PARAMS (reserved bytes, NUM_L2_VMS, MSR_CONFIG_CTLS,
IA32_ARCH_CAPABILITIES_CONFIG, the 2.0 event filters) is not an input here, nor is
host state a request cannot change (IA32_TSC_ADJUST, MISC_ENABLE, TDCS pages).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvmtdx.model.tdx_module_tables import ModuleTables
from kvmtdx.sim.tdx_cpuid import (
    ATTR_MIGRATABLE,
    ATTR_PERFMON,
    FLAG_GPAW,
    FLAG_MAXGPA_VIRT,
    FLAG_MAXPA_VIRT,
    NO_SUBLEAF,
    TDX_OPERAND_INVALID,
    CpuidProcessor,
    Refusal,
    Td,
    unpack,
)
from kvmtdx.sim.tdx_platform import CpuHost, Platform, Regs, generation_of, sys_init
from kvmtdx.status import Operand

OPERAND_ATTRIBUTES = int(Operand.ATTRIBUTES)
OPERAND_XFAM = int(Operand.XFAM)
OPERAND_EXEC_CONTROLS = int(Operand.EXEC_CONTROLS)
OPERAND_EPTP_CONTROLS = int(Operand.EPTP_CONTROLS)
OPERAND_MAX_VCPUS = int(Operand.MAX_VCPUS)
OPERAND_TSC_FREQUENCY = int(Operand.TSC_FREQUENCY)

ATTR_DEBUG = 1 << 0
ATTR_ICSSD = 1 << 16
FLAG_NO_RBP_MOD = 1 << 2
# XFAM bits check_xfam pairs up (x86_defs.h ia32_xcr0_t).
XFAM_AVX, XFAM_AVX512 = 1 << 2, (1 << 5 | 1 << 6 | 1 << 7)
XFAM_CET, XFAM_AMX = (1 << 11 | 1 << 12), (1 << 17 | 1 << 18)
# EPTP (x86_defs.h ia32e_eptp_t; MT_WB 6, LVL_PML4 3, LVL_PML5 4).
EPTP_MT_WB, PWL_4, PWL_5 = 6, 3, 4
EPTP_DEFAULT = EPTP_MT_WB | PWL_4 << 3
_CONFIGURATIONS_KEPT = 256


@dataclass(frozen=True, slots=True)
class ConfigRow:
    """One CPUID_CONFIG row as the module reports it."""

    leaf: int
    subleaf: int  # the module's: 0xFFFFFFFF for a leaf without sub-leaves
    values: Regs  # config_direct | (allow_direct & native)


@dataclass(frozen=True, slots=True)
class TdConf:
    """What the module reports about the TDs it can build, on this host (TDH.SYS.RD)."""

    attributes_fixed0: int
    attributes_fixed1: int
    xfam_fixed0: int
    xfam_fixed1: int
    cpuid_config: tuple[ConfigRow, ...]


@dataclass(frozen=True, slots=True)
class TdParams:
    """The TD_PARAMS fields TDH.MNG.INIT reads that KVM fills in."""

    attributes: int
    xfam: int
    cpuid_values: tuple[Regs, ...]  # one per CPUID_CONFIG row, in row order
    max_vcpus: int = 1
    config_flags: int = FLAG_NO_RBP_MOD
    eptp_controls: int = EPTP_DEFAULT
    tsc_frequency: int = 84  # 2.1 GHz in units of 25 MHz


@dataclass(frozen=True, slots=True)
class MngInit:
    """TDH.MNG.INIT's answer: the status, RCX, and on success the TD's CPUID."""

    status: int
    rcx: int = 0
    # TDCS CPUID_VALUES per cpuid_lookup entry, packed (tdx_cpuid.pack), and their keys.
    values: tuple[int, ...] = ()
    keys: tuple[tuple[int, int | None], ...] = ()
    # Entries whose CPUID_VALID is 0 (1.5.x faulting leaves): the TD gets #VE there.
    faulting: frozenset[tuple[int, int | None]] = frozenset()

    @property
    def cpuid(self) -> Mapping[tuple[int, int | None], Regs]:
        """The TD's CPUID per (leaf, sub-leaf or None): what KVM_TDX_GET_CPUID reads later."""
        return {k: unpack(v) for k, v in zip(self.keys, self.values, strict=True)}


class TdxModule:
    """The TDX module of `tables` after TDH.SYS.INIT on `host`."""

    def __init__(self, tables: ModuleTables, host: CpuHost) -> None:
        self.tables = tables
        self.host = host
        self.generation = generation_of(tables.version)
        self.platform: Platform = sys_init(tables, host)
        p = self.platform
        self.td_conf = TdConf(
            attributes_fixed0=p.attributes_fixed0, attributes_fixed1=p.attributes_fixed1,
            xfam_fixed0=p.xfam_fixed0, xfam_fixed1=p.xfam_fixed1,
            cpuid_config=tuple(
                ConfigRow(r.leaf, NO_SUBLEAF if r.subleaf is None else r.subleaf, v)
                for r, v in zip(tables.configurable, p.cpuid_config, strict=True)))
        self.cpuid = CpuidProcessor(tables, self.generation, p)
        self.min_pa_pml5 = tables.const("MIN_PA_FOR_PML5")
        # get_cpuid_lookup_entry: per leaf, its lookup keys in array order.
        self._lookup_of: dict[int, list[tuple[int, int | None]]] = {}
        for e in tables.lookup:
            self._lookup_of.setdefault(e.leaf, []).append(e.key)
        self._fixed0 = _fixed0_leaves(tables.constants)
        self._configurations: dict[tuple[int, ...], int] = {}

    def mng_rd_cpuid(self, values: Mapping[tuple[int, int | None], Regs],
                     invalid: frozenset[tuple[int, int | None]], leaf: int,
                     subleaf: int | None) -> Regs | None:
        """TDH.MNG.RD of a TD's CPUID_VALUES field for (leaf, sub-leaf or SUBLEAF_NA): None
        for a refused read (metadata_td.c md_td_get_element).

        The field names a lookup entry whose sub-leaf is NA or the one asked, the first in
        array order.  1.5.x: no such entry is FIELD_ID_INCORRECT, a faulting (not
        CPUID_VALID) one NOT_READABLE.  2.0: a leaf in TDCS.CPUID_FIXED0_BITMAP reads as
        zeros to the host, any other leaf without an entry is NOT_READABLE."""
        if leaf in self._fixed0:
            return (0, 0, 0, 0)
        for key in self._lookup_of.get(leaf, ()):
            if key[1] is None or key[1] == subleaf:
                return None if key in invalid else values.get(key, (0, 0, 0, 0))
        return None

    def mng_init(self, params: TdParams) -> MngInit:
        """TDH.MNG.INIT on TD_PARAMS; the first failing rule in the module's order decides."""
        status = self._td_configuration(params)
        if status:
            return MngInit(status)
        td = Td(attributes=params.attributes, xfam=params.xfam,
                config_flags=params.config_flags, tsc_frequency=params.tsc_frequency,
                config_values=params.cpuid_values, values=[])
        try:
            self.cpuid.run(td)
        except Refusal as r:
            return MngInit(r.status, r.rcx)
        return MngInit(0, values=tuple(td.values), keys=self.cpuid.keys,
                       faulting=self.cpuid.faulting)

    # ------------------------------------------------------------------
    # read_and_set_td_configurations, in its order.

    def _td_configuration(self, params: TdParams) -> int:
        """The status of the TD_PARAMS fields checked first; KVM sends few combinations of
        them, so each one's is remembered."""
        key = (params.attributes, params.xfam, params.max_vcpus, params.config_flags,
               params.eptp_controls, params.tsc_frequency)
        status = self._configurations.get(key)
        if status is None:
            status = self._configuration_status(params)
            if len(self._configurations) >= _CONFIGURATIONS_KEPT:
                self._configurations.clear()
            self._configurations[key] = status
        return status

    def _configuration_status(self, params: TdParams) -> int:
        if not self._attributes_ok(params.attributes):
            return TDX_OPERAND_INVALID + OPERAND_ATTRIBUTES
        if not self._xfam_ok(params.xfam):
            return TDX_OPERAND_INVALID + OPERAND_XFAM
        limit = self.tables.max_vcpus_per_td
        if params.max_vcpus == 0 or (self.generation.max_vcpus_limit and limit is not None
                                     and params.max_vcpus > limit):
            return TDX_OPERAND_INVALID + OPERAND_MAX_VCPUS
        if not self._config_flags_ok(params.config_flags):
            return TDX_OPERAND_INVALID + OPERAND_EXEC_CONTROLS
        if not self._eptp_ok(params.eptp_controls, params.config_flags):
            return TDX_OPERAND_INVALID + OPERAND_EPTP_CONTROLS
        t = self.tables
        if not t.tsc_frequency_min <= params.tsc_frequency <= t.tsc_frequency_max:
            return TDX_OPERAND_INVALID + OPERAND_TSC_FREQUENCY
        return 0

    def _attributes_ok(self, a: int) -> bool:
        """verify_td_attributes: fixed bits; a MIGRATABLE TD is neither DEBUG nor PERFMON."""
        p = self.platform
        if a & ~p.attributes_fixed0 or a & p.attributes_fixed1 != p.attributes_fixed1:
            return False
        if a & ATTR_MIGRATABLE and a & (ATTR_DEBUG | ATTR_PERFMON):
            return False
        return not (self.generation.perfmon_icssd and a & ATTR_PERFMON and a & ATTR_ICSSD)

    def _xfam_ok(self, x: int) -> bool:
        """check_xfam: allowed bits, fixed-1 bits, and the bit groups that go together."""
        p = self.platform
        if x & ~p.xfam_fixed0 or x & p.xfam_fixed1 != p.xfam_fixed1:
            return False
        if x & XFAM_AVX512 and not x & XFAM_AVX:
            return False
        return all(x & group in (0, group) for group in (XFAM_AVX512, XFAM_CET, XFAM_AMX))

    def _config_flags_ok(self, f: int) -> bool:
        """verify_td_config_flags (2.0 also: MAXPA_VIRT and MAXGPA_VIRT exclude each other)."""
        p = self.platform
        if f & ~p.config_flags_fixed0 or f & p.config_flags_fixed1 != p.config_flags_fixed1:
            return False
        both = FLAG_MAXPA_VIRT | FLAG_MAXGPA_VIRT
        return not (self.generation.maxpa_flags and f & both == both)

    def _eptp_ok(self, e: int, flags: int) -> bool:
        """verify_and_set_td_eptp_controls."""
        pwl = e >> 3 & 7
        max_pwl = PWL_5 if self.platform.pml5 else PWL_4
        # MT, page-walk length, A/D, SSS, reserved 11:8, base address 51:12, reserved 63:52.
        if e & 7 != EPTP_MT_WB or not PWL_4 <= pwl <= max_pwl or e >> 6:
            return False
        if self.generation.pml5_needs_min_pa and pwl == PWL_5 and (
                self.platform.max_pa < self.min_pa_pml5):
            return False
        return not (flags & FLAG_GPAW and pwl < PWL_5)


def _fixed0_leaves(constants: Mapping[str, int | None]) -> frozenset[int]:
    """The leaves CPUID_FIXED0_BITMAP marks all-zero: bit n for base leaf n below the base
    range, bit base+n for leaf 0x80000000+n (the layout the 2.0.08 bitmap's own bits show:
    0x80000003-5 zero after the brand string's fixed 0x80000002)."""
    bitmap, base = constants.get("CPUID_FIXED0_BITMAP"), constants.get(
        "CPUID_FIXED0_BITMAP_BASE_RANGE")
    if bitmap is None or base is None:
        return frozenset()
    return frozenset(n if n < base else 0x80000000 + n - base
                     for n in range(64) if bitmap >> n & 1)

"""What the simulated TDX module makes of its host at TDH.SYS.INIT and TDH.SYS.CONFIG.

The sim's own reading of intel/tdx-module (tdh_sys_init.c check_cpuid_configurations
and tdh_sys_init, helpers.c complete_cpuid_handling, metadata_sys.c for what
TDH.SYS.RD reports), independent of kvmtdx.model's.  Only the module's DATA is
shared (`ModuleTables`: the converted cpuid_lookup / cpuid_configurable tables, the
fixed bits and constants of one version); which code paths a version runs is this
file's own `Generation`, read from the three bundled versions' sources.

The host is read through `CpuHost`: its name, its raw CPUID, IA32_ARCH_CAPABILITIES.
TSX_CTRL and 5-level EPT, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from kvmtdx.model.tdx_module_tables import ModuleTables

Regs = tuple[int, int, int, int]
ZERO: Regs = (0, 0, 0, 0)
EXTENDED_BASE = 0x80000000
XSAVE_LEGACY_AREA = 576  # 512-byte legacy region + the 64-byte XSAVE header
_STEPPING = 0xF  # CPUID_S_MASK


class CpuHost(Protocol):
    """The host as the simulated module may read it."""

    @property
    def name(self) -> str: ...

    @property
    def native(self) -> Mapping[tuple[int, int | None], Regs]: ...

    @property
    def tsx_ctrl(self) -> bool: ...

    @property
    def ept_5level(self) -> bool: ...

    def cpuid(self, leaf: int, subleaf: int | None) -> Regs: ...


@dataclass(frozen=True, slots=True)
class Generation:
    """Which form of each version-dependent path a module runs (read per bundled source).

    1.5.01 = TDX_1.5.01 (72d8cff), 1.5.05 = e98d963 (TDX 1.5.05), 2.0 = 1666adc (2.0.08).
    """

    name: str
    max_vcpus_limit: bool  # MAX_VCPUS > MAX_VCPUS_PER_TD refused (1.5.05 on)
    pml5_needs_min_pa: bool  # 5-level EPT refused below MIN_PA_FOR_PML5 (1.5.x)
    perfmon_icssd: bool  # PERFMON with ICSSD refused (2.0)
    maxpa_flags: bool  # CONFIG_FLAGS MAXPA_VIRT / MAXGPA_VIRT and their 0x80000008 rules (2.0)
    fms_zero_checked: bool  # a 0 F/M/S, once replaced by the platform's, is still checked (1.5.x)
    tsx_mismatch_rcx: bool  # HLE != RTM reports the leaf in RCX (1.5.05 on)
    perfmon_ext: bool  # 7.1 PERFMON_EXT flag, 7.1 LASS, 0x1A and 0x23 rules (1.5.05 on)
    leaf_23_bitmap: bool  # 0x23.n (n > 0) zeroed unless bit n of 0x23.0 EAX (2.0)
    sysinit_23_zeroed: bool  # TDH.SYS.INIT zeroes 0x23 on a CPU without PERFMON_EXT (2.0)
    topology: int  # 0: none (1.5.01); 1: check_cpuid_1f (1.5.05); 2: ..._and_compute_cpuid_0b
    faulting_leaves: bool  # CPUID_VALID = !faulting (1.5.x); always valid (2.0)


GEN_1_5_01 = Generation("1.5.01", max_vcpus_limit=False, pml5_needs_min_pa=True,
                        perfmon_icssd=False, maxpa_flags=False, fms_zero_checked=True,
                        tsx_mismatch_rcx=False, perfmon_ext=False, leaf_23_bitmap=False,
                        sysinit_23_zeroed=False, topology=0, faulting_leaves=True)
GEN_1_5_05 = Generation("1.5.05", max_vcpus_limit=True, pml5_needs_min_pa=True,
                        perfmon_icssd=False, maxpa_flags=False, fms_zero_checked=True,
                        tsx_mismatch_rcx=True, perfmon_ext=True, leaf_23_bitmap=False,
                        sysinit_23_zeroed=False, topology=1, faulting_leaves=True)
GEN_2_0 = Generation("2.0", max_vcpus_limit=True, pml5_needs_min_pa=False,
                     perfmon_icssd=True, maxpa_flags=True, fms_zero_checked=False,
                     tsx_mismatch_rcx=True, perfmon_ext=True, leaf_23_bitmap=True,
                     sysinit_23_zeroed=True, topology=2, faulting_leaves=False)


def generation_of(version: str) -> Generation:
    """The generation a module version belongs to: the newest read source not after it."""
    try:
        major, minor, update = (int(x) for x in version.split("."))
    except ValueError:
        raise ValueError(f"TDX module version {version!r} is not MAJOR.MINOR.UPDATE") from None
    if major >= 2:
        return GEN_2_0
    return GEN_1_5_05 if (major, minor, update) >= (1, 5, 5) else GEN_1_5_01


@dataclass(frozen=True, slots=True)
class Platform:
    """The module's global state after TDH.SYS.INIT and TDH.SYS.CONFIG on one host."""

    native: tuple[Regs, ...]  # per cpuid_lookup entry: sampled, FIXED0/DYNAMIC cleared, FIXED1 set
    fms: int  # platform F/M/S (one package: CPUID(1).EAX)
    allowed_fms: tuple[int, ...]  # cpuid_fms.c allowed_fms[], newest family first
    xcr0_supported: int
    xss_supported: int
    xfd_faulting_mask: int
    max_pa: int
    tsx_ctrl: bool
    pml5: bool
    attributes_fixed0: int
    attributes_fixed1: int
    xfam_fixed0: int  # TDX_XFAM_FIXED0 & (XCR0 | XSS supported): check_xfam's and TDH.SYS.RD's
    xfam_fixed1: int
    config_flags_fixed0: int
    config_flags_fixed1: int
    xsave_ends: tuple[int, ...]  # per XCR0 bit: end of that user component's XSAVE area
    cpuid_config: tuple[Regs, ...]  # CPUID_CONFIG_VALUES, per cpuid_configurable row

    def fms_allowed(self, fms: int) -> bool:
        """check_fms_config (cpuid_fms.c): a MIGRATABLE TD's F/M/S, stepping at most the
        platform's for its own family/model, else a family/model of the table from the
        platform's position on, stepping at most the table's."""
        family_model = fms & ~_STEPPING
        platform_fm = self.fms & ~_STEPPING
        if family_model == platform_fm and fms & _STEPPING > self.fms & _STEPPING:
            return False
        start = next((i for i, f in enumerate(self.allowed_fms)
                      if f & ~_STEPPING == platform_fm), None)
        if start is None:
            raise ValueError(f"platform F/M/S 0x{self.fms:x} is not in the module's table: "
                             "the module would not have loaded (find_table_start FATAL)")
        found = False
        for f in self.allowed_fms[start:]:
            if f & ~_STEPPING == family_model:
                found = True
                if fms & _STEPPING > f & _STEPPING:
                    return False
        return found


@dataclass(slots=True)
class _Sample:
    """What the sampling loop learns on its way (check_cpuid_configurations' globals)."""

    fms: int = 0
    lass: bool = False
    perfmon_ext: bool = False
    xcr0: int = 0
    xss: int = 0
    xfd: bool = False
    xfd_faulting_mask: int = 0
    max_pa: int = 0


def _in_range(leaf: int, last_base: int, last_extended: int) -> bool:
    if leaf < EXTENDED_BASE:
        return leaf <= last_base
    return leaf <= last_extended


def _note(tables: ModuleTables, gen: Generation, s: _Sample, leaf: int, sub: int | None,
          regs: Regs) -> Regs:
    """The special handling of selected leaves while sampling; returns what is stored."""
    a, _, c, _ = regs
    if leaf == 1:
        s.fms = a
    elif (leaf, sub) == (7, 1):
        s.lass = bool(a >> 6 & 1)
        s.perfmon_ext = bool(a >> 8 & 1)
    elif (leaf, sub) == (0xD, 0):
        s.xcr0 = a & tables.const("XCR0_USER_BIT_MASK")
    elif (leaf, sub) == (0xD, 1):
        s.xfd = bool(a >> 4 & 1)
        s.xss = c & tables.const("XCR0_SUPERVISOR_BIT_MASK")
    elif leaf == 0xD and sub is not None and s.xfd and c >> 2 & 1:
        s.xfd_faulting_mask |= 1 << sub
    elif leaf == 0x23 and gen.sysinit_23_zeroed and not s.perfmon_ext:
        return ZERO
    elif leaf == 0x80000008:
        s.max_pa = a & 0xFF
    return regs


def _sample(tables: ModuleTables, gen: Generation, host: CpuHost) -> tuple[list[Regs], _Sample]:
    """check_cpuid_configurations: CPUID of every lookup entry, 0 past the CPU's last leaf."""
    last_base = host.cpuid(0, None)[0]
    last_extended = host.cpuid(EXTENDED_BASE, None)[0]
    s = _Sample()
    raw: list[Regs] = []
    for e in tables.lookup:
        regs = host.cpuid(e.leaf, e.subleaf) if _in_range(
            e.leaf, last_base, last_extended) else ZERO
        raw.append(_note(tables, gen, s, e.leaf, e.subleaf, regs))
    return raw, s


def _complete(tables: ModuleTables, raw: list[Regs]) -> tuple[Regs, ...]:
    """complete_cpuid_handling (TDH.SYS.CONFIG): clear FIXED0/DYNAMIC bits, set FIXED1 bits."""
    out: list[Regs] = []
    for e, regs in zip(tables.lookup, raw, strict=True):
        a, b, c, d = ((v & ~f0) | f1 for v, f0, f1 in
                      zip(regs, e.fixed0_or_dynamic, e.fixed1, strict=True))
        out.append((a, b, c, d))
    return tuple(out)


def _platform_attribute(needs: str, s: _Sample, host: CpuHost) -> bool:
    """Whether the platform has what an ATTRIBUTES_FIXED0 bit needs (tdh_sys_init)."""
    if needs == "lass_supported":
        return s.lass
    if needs == "is_tdx_io_supported":
        # MCHECK's IO system-info table version; a host without it is not a TDX Connect host.
        return bool(getattr(host, "tdx_io", False))
    raise ValueError(f"TDX module table: unknown platform requirement {needs!r}")


def _xsave_ends(tables: ModuleTables, host: CpuHost) -> tuple[int, ...]:
    """Per XCR0 bit n >= 2: offset + size of component n, as CPUID(0xD, n) gives them."""
    ends = [0, 0]
    for n in range(2, tables.const("XCR0_MAX_VALID_BIT") + 1):
        size, offset, _, _ = host.cpuid(0xD, n)
        ends.append(offset + size)
    return tuple(ends)


def sys_init(tables: ModuleTables, host: CpuHost) -> Platform:
    """TDH.SYS.INIT + TDH.SYS.CONFIG of `tables`' module on `host`."""
    gen = generation_of(tables.version)
    raw, s = _sample(tables, gen, host)
    native = _complete(tables, raw)
    fixed0 = tables.attributes_fixed0
    for p in tables.attributes_platform:
        if not _platform_attribute(p.needs, s, host):
            fixed0 &= ~(1 << p.bit)
    xfam_fixed0 = tables.xfam_fixed0 & (s.xcr0 | s.xss)
    # metadata_sys.c: CPUID_CONFIG_VALUES = config_direct | (allow_direct & native value).
    config = []
    for row in tables.configurable:
        nat = native[row.lookup_index]
        a, b, c, d = (cd | (ad & n) for cd, ad, n in
                      zip(row.config_direct, row.allow_direct, nat, strict=True))
        config.append((a, b, c, d))
    return Platform(
        native=native, fms=s.fms, allowed_fms=tables.allowed_fms, xcr0_supported=s.xcr0,
        xss_supported=s.xss,
        xfd_faulting_mask=s.xfd_faulting_mask, max_pa=s.max_pa, tsx_ctrl=host.tsx_ctrl,
        pml5=host.ept_5level, attributes_fixed0=fixed0,
        attributes_fixed1=tables.attributes_fixed1, xfam_fixed0=xfam_fixed0,
        xfam_fixed1=tables.xfam_fixed1, config_flags_fixed0=tables.config_flags_fixed0,
        config_flags_fixed1=tables.config_flags_fixed1, xsave_ends=_xsave_ends(tables, host),
        cpuid_config=tuple(config))


def xsave_area_size(platform: Platform, xcr0: int) -> int:
    """CPUID(0xD, 0).EBX with XCR0 = `xcr0`: the end of the last enabled user component."""
    size = XSAVE_LEGACY_AREA
    for n, end in enumerate(platform.xsave_ends):
        if n >= 2 and xcr0 >> n & 1:
            size = max(size, end)
    return size

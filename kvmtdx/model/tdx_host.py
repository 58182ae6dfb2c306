"""The CPU a TDX module and KVM run on, and what TDH.SYS.INIT samples from it.

`Host` is the one host type of the model: the raw native CPUID, the few MSR
facts TDH.MNG.INIT reads, and what KVM needs of the CPU (the XCR0 | XSS it
supports, 5-level EPT).  `sampled_native` is the module's global CPUID_VALUES
after TDH.SYS.INIT and TDH.SYS.CONFIG (complete_cpuid_handling): the starting
point of every TD's virtual CPUID.  `host_problems` applies TDH.SYS.INIT's CPUID
checks, so a host that no real module would initialise on is never used silently.
Loading host files is kvmtdx.model.host_files' job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kvmtdx.model.memo import per_object, per_pair
from kvmtdx.model.tdx_module_tables import ZERO, ModuleTables, Regs, TablesError

XSAVE_LEGACY_AND_HEADER = 576  # 512-byte legacy region + 64-byte XSAVE header
PERFMON_EXT_LEAF = 0x23
LEVEL_TYPE_SMT, LEVEL_TYPE_CORE = 1, 2
DEFAULT_TSC_KHZ = 2_100_000  # what a host without leaf 0x15 is taken to run at


@dataclass(frozen=True, slots=True)
class Host:
    """Native CPUID ((leaf, sub-leaf or None) -> [eax, ebx, ecx, edx]) and MSR facts.

    A leaf missing from `native` reads as zeros.  `kvm_xfam` is the XCR0 | XSS the
    host's KVM supports when a host file says so; otherwise it is what CPUID 0xD
    enumerates (`xfam_supported`).
    """

    name: str
    native: Mapping[tuple[int, int | None], Regs] = field(default_factory=dict)
    tsx_ctrl: bool = False  # IA32_ARCH_CAPABILITIES.TSX_CTRL (bit 7)
    ept_5level: bool = False  # IA32_VMX_EPT_VPID_CAP: 5-level EPT (PML5)
    tdx_io: bool = False  # TDX Connect (is_tdx_io_supported)
    about: str = ""
    kvm_xfam: int | None = None

    def cpuid(self, leaf: int, subleaf: int | None) -> Regs:
        """What the CPU returns; a leaf listed without sub-leaves answers every sub-leaf, and
        a leaf listed by sub-leaf answers "no sub-leaf" with sub-leaf 0."""
        regs = self.native.get((leaf, subleaf))
        if regs is None:
            regs = self.native.get((leaf, None) if subleaf is not None else (leaf, 0))
        return regs if regs is not None else ZERO

    def native_regs(self, leaf: int, subleaf: int | None) -> Regs:
        return self.cpuid(leaf, subleaf)

    def in_range(self, leaf: int) -> bool:
        """TDH.SYS.INIT reads a leaf only up to the CPU's last base / extended leaf."""
        if leaf < 0x80000000:
            return leaf <= self.cpuid(0, None)[0]
        return leaf <= self.cpuid(0x80000000, None)[0]

    @property
    def fms(self) -> int:
        return self.cpuid(1, None)[0]

    def native_fms(self) -> int:
        return self.fms

    @property
    def la57(self) -> bool:
        return bool(self.cpuid(7, 0)[2] >> 16 & 1)

    @property
    def lass(self) -> bool:
        return bool(self.cpuid(7, 1)[0] >> 6 & 1)

    @property
    def max_pa(self) -> int:
        return self.cpuid(0x80000008, None)[0] & 0xFF

    @property
    def xfam_supported(self) -> int:
        """The XCR0 | XSS KVM supports: the host file's word, else CPUID 0xD.0 EDX:EAX (user
        state) | 0xD.1 EDX:ECX (supervisor state)."""
        if self.kvm_xfam is not None:
            return self.kvm_xfam
        d0, d1 = self.cpuid(0xD, 0), self.cpuid(0xD, 1)
        return d0[0] | d0[3] << 32 | d1[2] | d1[3] << 32

    @property
    def tsc_khz(self) -> int:
        """The TSC frequency KVM gives a TD: crystal clock * ratio from leaf 0x15."""
        den, num, crystal, _ = self.cpuid(0x15, None)
        return crystal * num // den // 1000 if den and num and crystal else DEFAULT_TSC_KHZ

    @property
    def present_cpus(self) -> int:
        """Logical processors in the package: the widest 0x1F level's EBX (at least 1)."""
        counts = [self.cpuid(0x1F, s)[1] & 0xFFFF for s in range(6)
                  if self.cpuid(0x1F, s)[2] >> 8 & 0xFF]
        return max([1, *counts])

    def xcr0_supported(self, tables: ModuleTables) -> int:
        return self.cpuid(0xD, 0)[0] & tables.const("XCR0_USER_BIT_MASK")

    def xss_supported(self, tables: ModuleTables) -> int:
        return self.cpuid(0xD, 1)[2] & tables.const("XCR0_SUPERVISOR_BIT_MASK")

    def xfd_faulting_mask(self, tables: ModuleTables) -> int:
        """Components whose 0xD.n ECX[2] says XFD faults, if the CPU has XFD (0xD.1 EAX[4])."""
        if not self.cpuid(0xD, 1)[0] >> 4 & 1:
            return 0
        top = tables.const("XCR0_MAX_VALID_BIT")
        return sum(1 << n for n in range(2, top + 1) if self.cpuid(0xD, n)[2] >> 2 & 1)

    def xsave_size(self, xcr0: int) -> int:
        """CPUID(0xD, 0).EBX with XCR0 = xcr0: the end of the last enabled user component."""
        ends = [self.cpuid(0xD, n)[1] + self.cpuid(0xD, n)[0]
                for n in range(2, 64) if xcr0 >> n & 1 and not self.cpuid(0xD, n)[2] & 1]
        return max([XSAVE_LEGACY_AND_HEADER, *ends])

    def has(self, feature: str) -> bool:
        """A platform fact TDH.SYS.INIT tests by name (tables' attributes_platform)."""
        facts = {"lass_supported": self.lass, "is_tdx_io_supported": self.tdx_io}
        if feature not in facts:
            raise TablesError(f"host {self.name}: unknown platform fact {feature!r}")
        return facts[feature]


# The name the TDH.MNG.INIT model was written with; the same type.
HostCpu = Host


def _sampled(tables: ModuleTables, host: Host, leaf: int, subleaf: int | None) -> Regs:
    """What check_cpuid_configurations stores of one leaf before complete_cpuid_handling."""
    if not host.in_range(leaf):
        return ZERO
    if leaf == PERFMON_EXT_LEAF and tables.variant.sysinit_23_zeroed \
            and not host.cpuid(7, 1)[0] >> 8 & 1:
        return ZERO  # 2.0.08: "the CPU doesn't support leaf 0x23"
    return host.cpuid(leaf, subleaf)


@per_pair
def sampled_native(tables: ModuleTables, host: Host) -> tuple[Regs, ...]:
    """Global CPUID_VALUES per lookup entry: read (0 out of range), FIXED0/DYNAMIC cleared,
    FIXED1 set (tdh_sys_init.c check_cpuid_configurations, helpers.c complete_cpuid_handling)."""
    out: list[Regs] = []
    for e in tables.lookup:
        raw = _sampled(tables, host, e.leaf, e.subleaf)
        a, b, c, d = ((v & ~f) | s for v, f, s in zip(raw, e.fixed0_or_dynamic, e.fixed1,
                                                      strict=True))
        out.append((a, b, c, d))
    return tuple(out)


@per_object
def lookup_position(tables: ModuleTables) -> dict[int, int]:
    """cpuid_lookup[] index -> position in `tables.lookup` (processing order)."""
    return {e.index: i for i, e in enumerate(tables.lookup)}


def row_natives(tables: ModuleTables, host: Host) -> tuple[Regs, ...]:
    """The sampled native value of each CPUID_CONFIG row, in row order."""
    native = sampled_native(tables, host)
    position = lookup_position(tables)
    return tuple(native[position[row.lookup_index]] for row in tables.configurable)


@per_pair
def enumerate_config(tables: ModuleTables, host: Host) -> tuple[Regs, ...]:
    """CPUID_CONFIG_VALUES as TDH.SYS.RD reports them: config_direct | (allow_direct & native)."""
    out: list[Regs] = []
    for row, nat in zip(tables.configurable, row_natives(tables, host), strict=True):
        a, b, c, d = (cd | (ad & n) for cd, ad, n in
                      zip(row.config_direct, row.allow_direct, nat, strict=True))
        out.append((a, b, c, d))
    return tuple(out)


def full_request(tables: ModuleTables, host: Host) -> tuple[Regs, ...]:
    """Per CPUID_CONFIG row, what a VMM asking for everything would send: every enumerated
    allow_direct bit, and the native value in config_direct fields (F/M/S, caches, topology)."""
    out: list[Regs] = []
    for row, nat in zip(tables.configurable, row_natives(tables, host), strict=True):
        a, b, c, d = ((n & cd) | (n & ad) for cd, ad, n in
                      zip(row.config_direct, row.allow_direct, nat, strict=True))
        out.append((a, b, c, d))
    return tuple(out)


@per_pair
def reported_attributes_fixed0(tables: ModuleTables, host: Host) -> int:
    """ATTRIBUTES_FIXED0 after TDH.SYS.INIT removed the bits this platform lacks."""
    value = tables.attributes_fixed0
    for p in tables.attributes_platform:
        value = value | (1 << p.bit) if host.has(p.needs) else value & ~(1 << p.bit)
    return value


def reported_xfam_fixed0(tables: ModuleTables, host: Host) -> int:
    """XFAM_FIXED0 as metadata_sys.c reports it: TDX_XFAM_FIXED0 & (XCR0 | XSS supported)."""
    return tables.xfam_fixed0 & (host.xcr0_supported(tables) | host.xss_supported(tables))


# ---------------------------------------------------------------------------
# TDH.SYS.INIT's checks of the native CPUID (tdh_sys_init.c, check_cpuid_configurations).

def _verify_problems(tables: ModuleTables, host: Host) -> list[str]:
    out = []
    if host.cpuid(0, None)[0] < 0x1F:
        out.append("last base leaf below 0x1F (TDX_CPUID_LEAF_NOT_SUPPORTED)")
    if host.cpuid(0x80000000, None)[0] < 0x80000008:
        out.append("last extended leaf below 0x80000008 (TDX_CPUID_LEAF_NOT_SUPPORTED)")
    for e in tables.lookup:
        raw = host.cpuid(e.leaf, e.subleaf) if host.in_range(e.leaf) else ZERO
        for reg, (v, m, want) in enumerate(zip(raw, e.verify_mask, e.verify_value, strict=True)):
            if v & m != want:
                out.append(f"CPUID 0x{e.leaf:x}.{e.subleaf} register {reg}: 0x{v:08x} & "
                           f"0x{m:08x} != 0x{want:08x} (TDX_INCORRECT_CPUID_VALUE)")
    return out


def _perfmon_ext_problems(tables: ModuleTables, host: Host) -> list[str]:
    """2.0.08: with PERFMON_EXT, a 0x23 sub-leaf 0x23.0 EAX does not list must read as zeros,
    and 0x23.1 EBX must be the fixed-counter bitmap leaf 0xA gives."""
    if not tables.variant.sysinit_23_zeroed or not host.cpuid(7, 1)[0] >> 8 & 1:
        return []
    listed = host.cpuid(PERFMON_EXT_LEAF, 0)[0]
    out = [f"leaf 0x23.{e.subleaf}: not listed in 0x23.0 EAX, yet not zero "
           "(TDX_INCORRECT_CPUID_VALUE)" for e in tables.lookup
           if e.leaf == PERFMON_EXT_LEAF and e.subleaf and not listed >> e.subleaf & 1
           and host.cpuid(e.leaf, e.subleaf) != ZERO]
    _, _, a_ecx, a_edx = host.cpuid(0xA, None)
    if listed >> 1 & 1 and host.cpuid(PERFMON_EXT_LEAF, 1)[1] != ((1 << (a_edx & 0x1F)) - 1
                                                                  | a_ecx):
        out.append("leaf 0x23.1 EBX is not leaf 0xA's fixed-counter bitmap "
                   "(TDX_INCORRECT_CPUID_VALUE)")
    return out


def _value_problems(host: Host) -> list[str]:
    out = []
    a_eax, _, _, a_edx = host.cpuid(0xA, None)
    if a_eax & 0xFF < 5 or a_edx & 0x1F > 7:
        out.append("leaf 0xA: perfmon version < 5 or more than 7 fixed counters")
    if host.cpuid(0x15, None)[1] == 0 or host.cpuid(0x15, None)[0] == 0:
        out.append("leaf 0x15: no TSC/crystal ratio (TDX_CPUID_LEAF_NOT_SUPPORTED)")
    if host.cpuid(0x1C, None)[0] & 0xFF == 0:
        out.append("leaf 0x1C: no LBR depth")
    la_bits = host.cpuid(0x80000008, None)[0] >> 8 & 0xFF
    if la_bits != (57 if host.la57 else 48):
        out.append(f"leaf 0x80000008: LA bits {la_bits} do not match LA57={host.la57}")
    return out


def _topology_problems(tables: ModuleTables, host: Host) -> list[str]:
    """The native 0x1F scan of TDH.SYS.INIT: rising level types, a core level, L3 per package."""
    prev, shift, core_seen = 0, -1, False
    l3_ids = (host.cpuid(4, 3)[0] >> 14 & 0xFFF)
    for sub in range(tables.const("LEVEL_TYPE_MAX")):
        eax, _, ecx, _ = host.cpuid(0x1F, sub)
        level = ecx >> 8 & 0xFF
        if level == 0:
            if sub == 0 or not core_seen:
                return ["leaf 0x1F: no SMT/core levels (TDX_CPUID_LEAF_NOT_SUPPORTED)"]
            if prev and (l3_ids >> (shift - 1)) != 1:
                return ["leaf 4.3 / 0x1F: L3 not shared by exactly one package "
                        "(TDX_INVALID_WBINVD_SCOPE)"]
        elif level <= prev or level >= tables.const("LEVEL_TYPE_MAX"):
            return ["leaf 0x1F: level types not rising (TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED)"]
        else:
            shift, core_seen = eax & 0x1F, core_seen or level == LEVEL_TYPE_CORE
        prev = level
    return []


def host_problems(tables: ModuleTables, host: Host) -> list[str]:
    """Why TDH.SYS.INIT of this module would refuse this CPU; empty when it initialises."""
    return [*_verify_problems(tables, host), *_value_problems(host),
            *_perfmon_ext_problems(tables, host), *_topology_problems(tables, host)]

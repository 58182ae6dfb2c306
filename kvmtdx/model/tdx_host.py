"""The CPU a TDX module runs on, and what TDH.SYS.INIT samples from it.

`HostCpu` holds the raw native CPUID and the few MSR facts TDH.MNG.INIT reads.
`sampled_native` is the module's global CPUID_VALUES after TDH.SYS.INIT and
TDH.SYS.CONFIG (complete_cpuid_handling): the starting point of every TD's
virtual CPUID.  `host_problems` applies TDH.SYS.INIT's CPUID checks, so a host
that no real module would initialise on cannot be used silently.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from kvmtdx.model.tdx_module_tables import ZERO, ModuleTables, Regs, TablesError

XSAVE_LEGACY_AND_HEADER = 576  # 512-byte legacy region + 64-byte XSAVE header
LEVEL_TYPE_SMT, LEVEL_TYPE_CORE = 1, 2


@dataclass(frozen=True, slots=True)
class HostCpu:
    """Native CPUID ((leaf, sub-leaf or None) -> [eax, ebx, ecx, edx]) and MSR facts."""

    name: str
    native: Mapping[tuple[int, int | None], Regs]
    tsx_ctrl: bool  # IA32_ARCH_CAPABILITIES.TSX_CTRL (bit 7)
    ept_5level: bool  # IA32_VMX_EPT_VPID_CAP: 5-level EPT (PML5)
    tdx_io: bool  # TDX Connect (is_tdx_io_supported)
    about: str = ""

    def cpuid(self, leaf: int, subleaf: int | None) -> Regs:
        """What the CPU returns; a leaf listed without sub-leaves answers every sub-leaf."""
        regs = self.native.get((leaf, subleaf))
        if regs is None:
            regs = self.native.get((leaf, None))
        return regs if regs is not None else ZERO

    def in_range(self, leaf: int) -> bool:
        """TDH.SYS.INIT reads a leaf only up to the CPU's last base / extended leaf."""
        if leaf < 0x80000000:
            return leaf <= self.cpuid(0, None)[0]
        return leaf <= self.cpuid(0x80000000, None)[0]

    @property
    def fms(self) -> int:
        return self.cpuid(1, None)[0]

    @property
    def la57(self) -> bool:
        return bool(self.cpuid(7, 0)[2] >> 16 & 1)

    @property
    def lass(self) -> bool:
        return bool(self.cpuid(7, 1)[0] >> 6 & 1)

    @property
    def max_pa(self) -> int:
        return self.cpuid(0x80000008, None)[0] & 0xFF

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


def sampled_native(tables: ModuleTables, host: HostCpu) -> tuple[Regs, ...]:
    """Global CPUID_VALUES per lookup entry: read (0 out of range), FIXED0/DYNAMIC cleared,
    FIXED1 set (tdh_sys_init.c check_cpuid_configurations, helpers.c complete_cpuid_handling)."""
    out: list[Regs] = []
    for e in tables.lookup:
        raw = host.cpuid(e.leaf, e.subleaf) if host.in_range(e.leaf) else ZERO
        a, b, c, d = ((v & ~f) | s for v, f, s in zip(raw, e.fixed0_or_dynamic, e.fixed1,
                                                      strict=True))
        out.append((a, b, c, d))
    return tuple(out)


def enumerate_config(tables: ModuleTables, host: HostCpu) -> tuple[Regs, ...]:
    """CPUID_CONFIG_VALUES as TDH.SYS.RD reports them: config_direct | (allow_direct & native)."""
    native = sampled_native(tables, host)
    position = {e.index: i for i, e in enumerate(tables.lookup)}
    out: list[Regs] = []
    for row in tables.configurable:
        nat = native[position[row.lookup_index]]
        a, b, c, d = (cd | (ad & n) for cd, ad, n in
                      zip(row.config_direct, row.allow_direct, nat, strict=True))
        out.append((a, b, c, d))
    return tuple(out)


def full_request(tables: ModuleTables, host: HostCpu) -> tuple[Regs, ...]:
    """Per CPUID_CONFIG row, what a VMM asking for everything would send: every enumerated
    allow_direct bit, and the native value in config_direct fields (F/M/S, caches, topology)."""
    native = sampled_native(tables, host)
    position = {e.index: i for i, e in enumerate(tables.lookup)}
    out: list[Regs] = []
    for row in tables.configurable:
        nat = native[position[row.lookup_index]]
        a, b, c, d = ((n & cd) | (n & ad) for cd, ad, n in
                      zip(row.config_direct, row.allow_direct, nat, strict=True))
        out.append((a, b, c, d))
    return tuple(out)


def reported_attributes_fixed0(tables: ModuleTables, host: HostCpu) -> int:
    """ATTRIBUTES_FIXED0 after TDH.SYS.INIT removed the bits this platform lacks."""
    value = tables.attributes_fixed0
    for p in tables.attributes_platform:
        value = value | (1 << p.bit) if host.has(p.needs) else value & ~(1 << p.bit)
    return value


def reported_xfam_fixed0(tables: ModuleTables, host: HostCpu) -> int:
    """XFAM_FIXED0 as metadata_sys.c reports it: TDX_XFAM_FIXED0 & (XCR0 | XSS supported)."""
    return tables.xfam_fixed0 & (host.xcr0_supported(tables) | host.xss_supported(tables))


# ---------------------------------------------------------------------------
# TDH.SYS.INIT's checks of the native CPUID (tdh_sys_init.c, check_cpuid_configurations).

def _verify_problems(tables: ModuleTables, host: HostCpu) -> list[str]:
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


def _value_problems(host: HostCpu) -> list[str]:
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


def _topology_problems(tables: ModuleTables, host: HostCpu) -> list[str]:
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


def host_problems(tables: ModuleTables, host: HostCpu) -> list[str]:
    """Why TDH.SYS.INIT of this module would refuse this CPU; empty when it initialises."""
    return [*_verify_problems(tables, host), *_value_problems(host),
            *_topology_problems(tables, host)]


# ---------------------------------------------------------------------------
# Loading.

def host_from_json(data: Any, origin: str) -> HostCpu:
    if not isinstance(data, dict) or data.get("schema") != 1:
        raise TablesError(f"{origin}: not a schema-1 TDX host")
    native: dict[tuple[int, int | None], Regs] = {}
    try:
        for e in data["cpuid"]:
            a, b, c, d = (int(v, 0) for v in e["regs"])
            sub = e["subleaf"]
            native[(int(e["leaf"], 0), None if sub is None else int(sub))] = (a, b, c, d)
        return HostCpu(name=str(data["name"]), native=native, tsx_ctrl=bool(data["tsx_ctrl"]),
                       ept_5level=bool(data["ept_5level"]), tdx_io=bool(data["tdx_io"]),
                       about=str(data.get("about", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TablesError(f"{origin}: malformed host ({e!r})") from None


@functools.cache
def load_host(name: str = "max") -> HostCpu:
    """A bundled host (kvmtdx/data/tdx-hosts/<name>.json)."""
    path = resources.files("kvmtdx").joinpath("data").joinpath("tdx-hosts").joinpath(
        f"{name}.json")
    if not path.is_file():
        raise TablesError(f"unknown bundled TDX host {name!r}")
    return host_from_json(json.loads(path.read_text()), f"bundled host {name}")

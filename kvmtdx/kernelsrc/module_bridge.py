"""The TDX module behind the extracted kernel code: what tdx_get_sysinfo() and the SEAMCALLs
answer, taken from kvmtdx's module model.

This is the one place the kernel-source backend asks the model anything.  Pure:
no cffi, no OS; the backend hands in plain integers.

What the kernel reads at bring-up (`SysInfo`): the module's CPUID_CONFIG
table, one row per (leaf, sub-leaf) in the module's order, each row's
masks being what the module enumerates on this host (config_direct |
allow_direct & native), the fixed ATTRIBUTES/XFAM bits (XFAM fixed0 limited
to what the CPU supports, as the module reports it) and TDX_FEATURES0, whose
TOPOLOGY_ENUM bit only modules that check leaf 0x1F (1.5.05 on) set.
TDH.MNG.INIT is the module model's (kvmtdx.model.tdx_module, through the
mirror's module half), on the TD_PARAMS the kernel code built.  KVM's own
filtering (denylist, allowlist, GPAW) is the kernel code's business, not
this file's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from kvmtdx.model import tdx_module
from kvmtdx.model.mirror_module import decide, td_limits
from kvmtdx.model.profiles import Host, ModuleProfile, Regs, effective_xfam_fixed0, enumerated

NO_SUBLEAF = 0xFFFFFFFF
# TDX_FEATURES0.TOPOLOGY_ENUM (bit 20): Linux 7.3 refuses a module without it.
FEATURES0_TOPOLOGY_ENUM = 1 << 20


class Seamcall(IntEnum):
    """The SEAMCALLs the extracted code makes (kglue.c numbers them alike)."""

    MNG_CREATE = 1
    MNG_KEY_CONFIG = 2
    MNG_ADDCX = 3
    MNG_INIT = 4
    MR_FINALIZE = 5


@dataclass(frozen=True, slots=True)
class SysInfo:
    """The module's metadata as struct tdx_sys_info carries it to KVM."""

    attributes_fixed0: int
    attributes_fixed1: int
    xfam_fixed0: int
    xfam_fixed1: int
    features0: int
    leaves: tuple[int, ...]  # leaf | sub-leaf << 32 (0xFFFFFFFF: none)
    values: tuple[Regs, ...]


@dataclass(frozen=True, slots=True)
class TdParams:
    """TD_PARAMS as TDH.MNG.INIT reads it (the fields a CPUID decision can depend on)."""

    attributes: int
    xfam: int
    max_vcpus: int
    eptp_controls: int
    config_flags: int
    cpuid_values: tuple[Regs, ...]  # one per CPUID_CONFIG row, in the module's order


class ModuleBridge:
    """One TDX module on one host, answering the SEAMCALLs the kernel code makes."""

    def __init__(self, module: ModuleProfile, host: Host) -> None:
        self.module = module
        self.host = host

    def sysinfo(self) -> SysInfo:
        m = self.module
        return SysInfo(
            attributes_fixed0=m.attributes_fixed0,
            attributes_fixed1=m.attributes_fixed1,
            xfam_fixed0=effective_xfam_fixed0(m, self.host),
            xfam_fixed1=m.xfam_fixed1,
            features0=FEATURES0_TOPOLOGY_ENUM if m.enumerates_topology else 0,
            leaves=tuple(r.leaf | (NO_SUBLEAF if r.subleaf is None else r.subleaf) << 32
                         for r in m.rows),
            values=enumerated(m, self.host),
        )

    def seamcall(self, call: Seamcall, params: TdParams | None = None) -> tuple[int, int]:
        """(status, extended error) of one SEAMCALL."""
        if call == Seamcall.MNG_INIT:
            assert params is not None
            return self.mng_init(params)
        # Creating, keying and adding pages to a TD cannot fail for a request's sake.
        return 0, 0

    def mng_init(self, params: TdParams) -> tuple[int, int]:
        """TDH.MNG.INIT's (status, RCX) for these TD_PARAMS, from kvmtdx's module model."""
        tsc_khz, _ = td_limits(self.module.tables, self.host)
        p = tdx_module.TdParams(
            attributes=params.attributes, xfam=params.xfam, cpuid_values=params.cpuid_values,
            max_vcpus=params.max_vcpus, eptp_controls=params.eptp_controls,
            config_flags=params.config_flags, tsc_frequency=tsc_khz // 25000)
        result = decide(self.module.tables, self.host, p)
        return result.status, result.rcx

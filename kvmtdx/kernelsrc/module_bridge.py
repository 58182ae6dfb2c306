"""The TDX module behind the extracted kernel code: what tdx_get_sysinfo() and the SEAMCALLs
answer, taken from kvmtdx's module model.

This is the one place the kernel-source backend asks the model anything, so
switching to another module model (a TD_PARAMS-level `mng_init`) changes
this file only.  Pure: no cffi, no OS; the backend hands in plain integers.

What the kernel reads at bring-up (`SysInfo`): the module's CPUID_CONFIG
table, one row per (leaf, sub-leaf) in the module's order, each row's
masks being what the module enumerates on this host (config_direct |
allow_direct & native), and the fixed ATTRIBUTES/XFAM bits (XFAM fixed0
limited to what the CPU supports, as the module reports it).  KVM's own
filtering (denylist, allowlist, GPAW) is the kernel code's business, not
this file's.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import IntEnum

from kvmtdx.model import mirror
from kvmtdx.model.profiles import Host, ModuleProfile, Regs, effective_xfam_fixed0, enumerated
from kvmtdx.outcome import Kind

NO_SUBLEAF = 0xFFFFFFFF
# TDX_FEATURES0.TOPOLOGY_ENUM (bit 20): Linux 7.3 refuses a module without it.
FEATURES0_TOPOLOGY_ENUM = 1 << 20
# What TDH.MNG.INIT answers for virtual TSX on a host without TSX_CTRL: the status
# TDX_INCORRECT_MSR_VALUE with MSR 0x10A as operand (behaviour contract, section 4).
INCORRECT_MSR_VALUE_TSX_CTRL = 0xC00009210000010A
# Any status the module model cannot name (it should not happen): not an operand error,
# so the kernel takes its -EIO path.
TDX_SW_ERROR = 0xC000000000000000


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
            features0=FEATURES0_TOPOLOGY_ENUM,
            leaves=tuple(r.leaf | (NO_SUBLEAF if r.subleaf is None else r.subleaf) << 32
                         for r in m.rows),
            values=enumerated(m, self.host),
        )

    def seamcall(self, call: Seamcall, params: TdParams | None = None) -> tuple[int, int]:
        """(status, extended error) of one SEAMCALL."""
        if call == Seamcall.MNG_INIT:
            assert params is not None
            return self.mng_init(params), 0
        # Creating, keying and adding pages to a TD cannot fail for a request's sake.
        return 0, 0

    def mng_init(self, params: TdParams) -> int:
        """TDH.MNG.INIT's status for these TD_PARAMS, from kvmtdx's module model."""
        outcome = mirror.module_init(self.module, self.host, params.attributes, params.xfam,
                                     list(params.cpuid_values))
        if outcome.kind == Kind.ACCEPTED:
            return 0
        if outcome.hw_error:
            return outcome.hw_error
        if outcome.kind == Kind.ERROR and outcome.errno == errno.EIO:
            return INCORRECT_MSR_VALUE_TSX_CTRL
        return TDX_SW_ERROR

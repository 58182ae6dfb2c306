"""The simulated host's own TDX module: what it reports to KVM, and TDH.MNG.INIT.

KVM sees the module only through what it reports (`TdConf`, the kernel's
tdx_sys_info_td_conf plus the CPUID_CONFIG rows) and through the status
TDH.MNG.INIT returns on the TD_PARAMS KVM built.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.model.profiles import Host, ModuleProfile, effective_xfam_fixed0, enumerated
from kvmtdx.sim.facts import ATTR_PKS, HLE, PKS, RTM, ZERO, Regs
from kvmtdx.status import Operand, TdxStatus, operand_invalid
from kvmtdx.structs import REGISTERS


@dataclass(frozen=True, slots=True)
class ConfigRow:
    """One CPUID_CONFIG row as the module reports it."""

    leaf: int
    subleaf: int  # the module's: 0xFFFFFFFF for a leaf without sub-leaves
    values: Regs  # config_direct | (allow_direct & native)


@dataclass(frozen=True, slots=True)
class TdConf:
    """What the module reports about the TDs it can build, on this host."""

    attributes_fixed0: int
    attributes_fixed1: int
    xfam_fixed0: int
    xfam_fixed1: int
    cpuid_config: tuple[ConfigRow, ...]


class TdxModule:
    """The TDX module `profile` running on `host`."""

    def __init__(self, profile: ModuleProfile, host: Host) -> None:
        self.profile = profile
        self.host = host
        self.xfam_fixed0 = effective_xfam_fixed0(profile, host)
        self.td_conf = TdConf(
            attributes_fixed0=profile.attributes_fixed0,
            attributes_fixed1=profile.attributes_fixed1,
            xfam_fixed0=self.xfam_fixed0,
            xfam_fixed1=profile.xfam_fixed1,
            cpuid_config=tuple(
                ConfigRow(leaf=r.leaf, subleaf=r.module_subleaf, values=v)
                for r, v in zip(profile.rows, enumerated(profile, host), strict=True)),
        )
        self.allows: tuple[Regs, ...] = tuple(r.module_allows() for r in profile.rows)
        self.leaf1 = profile.row_index(1, None)
        self.leaf7 = profile.row_index(7, 0)
        self.gates = tuple(
            (g.xfam, profile.row_index(g.leaf, g.subleaf), REGISTERS.index(g.register), g.mask)
            for g in getattr(profile, "xfam_gates", ())
        )
        self.fms = host.native_fms()

    def mng_init(self, attributes: int, xfam: int, values: list[Regs]) -> int:
        """TDH.MNG.INIT's status on TD_PARAMS.

        Row values arrive in the module's row order (zeros for rows KVM found
        no entry for), as TD_PARAMS.CPUID_VALUES carries them.
        """
        p = self.profile
        td_attributes = attributes | p.attributes_fixed1
        td_xfam = xfam | p.xfam_fixed1
        if td_attributes & ~p.attributes_fixed0:
            return operand_invalid(Operand.ATTRIBUTES)
        if td_xfam & ~self.xfam_fixed0:
            return operand_invalid(Operand.XFAM)
        for (a, b, c, d), (ma, mb, mc, md) in zip(values, self.allows, strict=True):
            if a & ~ma or b & ~mb or c & ~mc or d & ~md:
                return operand_invalid(Operand.CPUID_CONFIG)
        leaf1 = ZERO if self.leaf1 is None else values[self.leaf1]
        leaf7 = ZERO if self.leaf7 is None else values[self.leaf7]
        # CPUID(1).EAX: 0 asks for the native family/model/stepping.
        if leaf1[0] and leaf1[0] != self.fms:
            return operand_invalid(Operand.CPUID_CONFIG)
        if bool(leaf7[1] & HLE) != bool(leaf7[1] & RTM):
            return operand_invalid(Operand.CPUID_CONFIG)
        if bool(leaf7[2] & PKS) != bool(td_attributes & ATTR_PKS):
            return operand_invalid(Operand.CPUID_CONFIG)
        for gate_xfam, row, register, mask in self.gates:
            if td_xfam & gate_xfam != gate_xfam and row is not None and (
                    values[row][register] & mask):
                return operand_invalid(Operand.CPUID_CONFIG)
        if leaf7[1] & HLE and not self.host.tsx_ctrl:
            return int(TdxStatus.TDX_INCORRECT_MSR_VALUE)
        # An allow_direct bit the CPU lacks is dropped silently, not refused.
        return 0

"""What KVM works out once, when it brings TDX up: per module row, what
KVM_TDX_CAPABILITIES reports and what KVM_TDX_INIT_VM checks.

The policy's denylist and allowlist, and the mutants that bend them, are
applied here, so the per-call paths (`tdx`, `td_init`) only look things up.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.model.policy import Allowlist, Policy
from kvmtdx.model.profiles import Host
from kvmtdx.sim import mutants
from kvmtdx.sim.facts import (
    ATTR_SEPT_VE_DISABLE,
    CORE_CAPABILITIES,
    GPAW_FIELD,
    GPAW_LEAF,
    HLE,
    NO_SUBLEAF,
    RTM,
    WAITPKG,
    ZERO,
    Regs,
)
from kvmtdx.sim.mutants import Mutant
from kvmtdx.sim.tdx_module import ConfigRow, TdConf
from kvmtdx.structs import REGISTERS, CpuidEntry


def supported_attrs(conf: TdConf) -> int:
    """tdx_get_supported_attrs: none at all unless KVM supports every fixed-1 attribute."""
    fixed1 = conf.attributes_fixed1
    if ATTR_SEPT_VE_DISABLE & fixed1 != fixed1:
        return 0
    return ATTR_SEPT_VE_DISABLE & conf.attributes_fixed0


def supported_xfam(conf: TdConf, host: Host) -> int:
    """tdx_get_supported_xfam: none at all unless the host supports every fixed-1 bit."""
    supported = host.xfam_supported
    fixed1 = conf.xfam_fixed1
    if supported & fixed1 != fixed1:
        return 0
    return supported & conf.xfam_fixed0


def _kvm_index(row: ConfigRow) -> int:
    """The row's index as KVM has it: the module's "no sub-leaves" becomes 0."""
    return 0 if row.subleaf == NO_SUBLEAF else row.subleaf


@dataclass(frozen=True, slots=True)
class Row:
    """What the simulated kernel precomputes of one module row for KVM_TDX_INIT_VM."""

    leaf: int
    index: int  # the index KVM looks the row up by
    subleaves: bool  # the module lists the row with a sub-leaf
    # Upstream's TSX/WAITPKG denylist can fire on what this row matches.
    denylist: bool
    # INIT_VM allowlist (rfc-v2): bits the module lists that KVM does not allow.
    forbidden: Regs
    checks_allowlist: bool


class CpuidTables:
    """KVM's view of the module's CPUID_CONFIG rows under `policy` (and `bug`)."""

    def __init__(self, conf: TdConf, policy: Policy, bug: Mutant | None) -> None:
        self.policy = policy
        self.bug = bug
        # Upstream's denylist: the TSX bits it hides and refuses in leaf 7.0 EBX.
        self.tsx = HLE if bug is mutants.DENYLIST_HLE_NOT_RTM else HLE | RTM
        self.caps_entries = tuple(self._caps_entry(r) for r in conf.cpuid_config)
        self.rows = tuple(self._init_vm_row(r) for r in conf.cpuid_config)
        rows_of: dict[int, list[tuple[int, int]]] = {}
        for k, row in enumerate(self.rows):
            rows_of.setdefault(row.leaf, []).append((k, row.index))
        # Per CPUID function: (row number, index) of every row of that function.
        self.rows_of_function = {f: tuple(v) for f, v in rows_of.items()}
        # The allowlist's refusals per (leaf, index), for a bug that looks them up by
        # an entry's own index.
        self.forbidden_at = {(r.leaf, r.index): r.forbidden for r in self.rows
                             if r.checks_allowlist}

    def _index(self, row: ConfigRow) -> int:
        """The index KVM reports and looks a row up by."""
        if self.bug is mutants.SUBLEAF_FFFFFFFF_UNMAPPED:
            return row.subleaf
        return _kvm_index(row)

    def _allowed(self, allowlist: Allowlist, leaf: int, index: int, register: str) -> int:
        """The allowlist's mask as this kernel (or its bug) has it."""
        if self.bug is mutants.VALUE_REGISTERS_FILTERED:
            mask = allowlist.allowed.get((leaf, index, register), 0)
        else:
            mask = allowlist.mask(leaf, index, register)
        if self.bug is mutants.CORE_CAPABILITIES_FORGOTTEN and (leaf, index, register) == (
                7, 0, "edx"):
            mask &= ~CORE_CAPABILITIES
        return mask

    def _caps_entry(self, row: ConfigRow) -> CpuidEntry:
        a, b, c, d = row.values
        index = self._index(row)
        if row.leaf == GPAW_LEAF and self.bug is not mutants.GPAW_NOT_FORCED:
            a |= GPAW_FIELD  # KVM's knob for the guest physical address width
        if self.policy.denylist is not None and row.leaf == 7 and index == 0:
            b &= ~self.tsx
            c &= ~WAITPKG
        allowlist = self.policy.allowlist
        if allowlist is not None and self.bug is not mutants.CAPS_ALLOWLIST_UNAPPLIED:
            gpaw = a & GPAW_FIELD if row.leaf == GPAW_LEAF else 0
            a, b, c, d = (v & self._allowed(allowlist, row.leaf, _kvm_index(row), r)
                          for v, r in zip((a, b, c, d), REGISTERS, strict=True))
            a |= gpaw
        return CpuidEntry(function=row.leaf, index=index, eax=a, ebx=b, ecx=c, edx=d)

    def _checks_row(self, leaf: int, index: int) -> bool:
        if self.bug is mutants.INIT_VM_ALLOWLIST_UNENFORCED:
            return False
        return not (self.bug is mutants.ALLOWLIST_SKIPS_ROW_7_1 and (leaf, index) == (7, 1))

    def _forbidden(self, allowlist: Allowlist, row: ConfigRow, kvm_index: int) -> Regs:
        regs = []
        for r, v in zip(REGISTERS, row.values, strict=True):
            allowed = self._allowed(allowlist, row.leaf, kvm_index, r)
            if self.bug is mutants.INIT_VM_VALUE_REGISTERS_FILTERED:
                allowed = allowlist.allowed.get((row.leaf, kvm_index, r), 0)
            bad = v & ~allowed
            if row.leaf == GPAW_LEAF and r == "eax":
                bad &= ~GPAW_FIELD  # GPAW has its own rule
            if self.bug is mutants.ALLOWLIST_SKIPS_7_0_EDX and (
                    row.leaf, kvm_index, r) == (7, 0, "edx"):
                bad = 0
            regs.append(bad)
        return (regs[0], regs[1], regs[2], regs[3])

    def _init_vm_row(self, row: ConfigRow) -> Row:
        kvm_index = _kvm_index(row)
        allowlist = self.policy.allowlist
        checks, forbidden = False, ZERO
        if allowlist is not None and self._checks_row(row.leaf, kvm_index):
            checks, forbidden = True, self._forbidden(allowlist, row, kvm_index)
        # find() only returns entries of the row's own function, so the denylist
        # (leaf 7 index 0 of the matched entry) can only fire on leaf 7 rows.
        return Row(leaf=row.leaf, index=self._index(row), subleaves=row.subleaf != NO_SUBLEAF,
                   denylist=self.policy.denylist is not None and row.leaf == 7,
                   forbidden=forbidden, checks_allowlist=checks)

"""KVM's TDX vCPU commands: KVM_MEMORY_ENCRYPT_OP on a TD vCPU (Linux 7.3 arch/x86/kvm/vmx/tdx.c).

kvm_vcpu_ioctl first offers the command to tdx_vcpu_unlocked_ioctl (KVM_TDX_INIT_VCPU,
KVM_TDX_INIT_MEM_REGION), which reads the command and checks the TD before answering
-ENOIOCTLCMD for anything else; then tdx_vcpu_ioctl takes KVM_TDX_GET_CPUID.  Neither
writes the command back.  KVM_TDX_GET_CPUID walks the TD's leaves through TDH.MNG.RD
(tdx_vcpu_get_cpuid, tdx_vcpu_get_cpuid_leaf, tdx_read_cpuid), asking the simulated
module (`TdxModule.mng_rd_cpuid`) for each.
"""

from __future__ import annotations

import errno

from kvmtdx import layout, uapi
from kvmtdx.sim import mutants
from kvmtdx.sim.facts import GPAW_FIELD, GPAW_LEAF, GPAW_SHIFT, NO_SUBLEAF, Regs
from kvmtdx.sim.mutants import Mutant
from kvmtdx.sim.state import Vcpu, Vm
from kvmtdx.sim.tdx_module import TdxModule
from kvmtdx.sim.uaccess import copy_from_user, copy_to_user, fail
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, KVM_MAX_CPUID_ENTRIES, CpuidEntry, TdxCmd

TDX_MD_UNREADABLE_LEAF_MASK = 0x7FFFFF80  # GENMASK(30, 7)
X2APIC = 1 << 21  # CPUID 1 ECX
APIC_DEFAULT_PHYS_BASE = 0xFEE00000
DEFAULT_MAXPHYADDR = 36  # cpuid_maxphyaddr() without leaf 0x80000008


class _Read:
    """One KVM_TDX_GET_CPUID: the entries read so far (td_cpuid->entries, i)."""

    def __init__(self, module: TdxModule, vm: Vm, bug: Mutant | None,
                 config_of: dict[tuple[int, int | None], int]) -> None:
        self.module, self.vm, self.bug, self.config_of = module, vm, bug, config_of
        self.values, self.invalid = vm.cpuid, vm.faulting  # built once per read
        self.entries: list[CpuidEntry] = []

    def read_cpuid(self, leaf: int, sub_leaf: int, sub_leaf_set: bool) -> int:
        """tdx_read_cpuid: 0, -EINVAL (never asked) or -EIO (the module refused)."""
        if sub_leaf > 0x7F or len(self.entries) >= KVM_MAX_CPUID_ENTRIES \
                or leaf & TDX_MD_UNREADABLE_LEAF_MASK:
            return -errno.EINVAL
        regs = self._value(leaf, sub_leaf if sub_leaf_set else None)
        if regs is None:
            return -errno.EIO
        eax, ebx, ecx, edx = regs
        if leaf == GPAW_LEAF and self.bug is not mutants.GET_CPUID_GPAW_UNFIXED:
            eax = eax & ~GPAW_FIELD | self.vm.gpaw << GPAW_SHIFT
        self.entries.append(CpuidEntry(leaf, sub_leaf if sub_leaf_set else 0,
                                       FLAG_SIGNIFICANT_INDEX if sub_leaf_set else 0,
                                       eax, ebx, ecx, edx))
        return 0

    def _value(self, leaf: int, subleaf: int | None) -> Regs | None:
        regs = self.module.mng_rd_cpuid(self.values, self.invalid, leaf, subleaf)
        row = self.config_of.get((leaf, subleaf))
        if regs is not None and row is not None and self.bug is mutants.GET_CPUID_RETURNS_REQUEST:
            return self.vm.config_values[row]
        return regs

    def get_leaf(self, leaf: int) -> int:
        """tdx_vcpu_get_cpuid_leaf: 0 when it added entries, else non-zero."""
        ret = self.read_cpuid(leaf, 0, False)
        if ret != -errno.EIO:
            return ret
        sub_leaf = 0
        while self.read_cpuid(leaf, sub_leaf, True) == 0:
            sub_leaf += 1
        return int(sub_leaf == 0)

    def walk(self) -> bool:
        """The basic range, then the extended one; False: -EIO."""
        if self.get_leaf(0):
            return False
        for leaf in range(1, self.entries[0].eax + 1):
            if leaf & TDX_MD_UNREADABLE_LEAF_MASK:
                break  # every later leaf is refused before TDH.MNG.RD too
            self.get_leaf(leaf)
        if self.get_leaf(0x80000000):
            return False
        for leaf in range(0x80000001, self.entries[-1].eax + 1):
            if leaf & TDX_MD_UNREADABLE_LEAF_MASK:
                break
            self.get_leaf(leaf)
        return True


class TdxVcpu:
    """The TDX commands of a TD's vCPUs, on a host whose module is `module`."""

    def __init__(self, module: TdxModule, bug: Mutant | None) -> None:
        self.module = module
        self.bug = bug
        self.config_of = {(r.leaf, None if r.subleaf == NO_SUBLEAF else r.subleaf): i
                          for i, r in enumerate(module.td_conf.cpuid_config)}

    def unlocked(self, vcpu: Vcpu, arg: int) -> int | None:
        """tdx_vcpu_unlocked_ioctl; None for -ENOIOCTLCMD (the locked path takes it)."""
        cmd = _get_cmd(arg)
        if not _td_alive(vcpu.vm):
            raise fail(errno.EINVAL)
        if cmd.id == uapi.TdxCommand.KVM_TDX_INIT_VCPU:
            return self._init_vcpu(vcpu, cmd)
        if cmd.id == uapi.TdxCommand.KVM_TDX_INIT_MEM_REGION:
            # The simulated TD has no guest_memfd memory to populate.
            raise fail(errno.EINVAL)
        return None

    def locked(self, vcpu: Vcpu, arg: int) -> int:
        """tdx_vcpu_ioctl."""
        if not _td_alive(vcpu.vm):
            raise fail(errno.EINVAL)
        cmd = _get_cmd(arg)
        if cmd.id != uapi.TdxCommand.KVM_TDX_GET_CPUID:
            raise fail(errno.EINVAL)
        return self._get_cpuid(vcpu.vm, cmd)

    def _get_cpuid(self, vm: Vm, cmd: TdxCmd) -> int:
        """tdx_vcpu_get_cpuid: E2BIG writes the header with the count it needs, no entries."""
        header = copy_from_user(cmd.data, layout.SIZEOF_CPUID2)
        nent = int.from_bytes(header[:4], "little")
        read = _Read(self.module, vm, self.bug, self.config_of)
        if not read.walk():
            raise fail(errno.EIO)
        count = len(read.entries)
        copy_to_user(cmd.data, count.to_bytes(4, "little") + header[4:])
        if nent < count:
            if self.bug is mutants.GET_CPUID_E2BIG_WRITES_ENTRIES:
                copy_to_user(cmd.data + layout.SIZEOF_CPUID2,
                             layout.pack_entries(tuple(read.entries[:nent])))
            raise fail(errno.E2BIG)
        copy_to_user(cmd.data + layout.SIZEOF_CPUID2, layout.pack_entries(tuple(read.entries)))
        return 0

    def _init_vcpu(self, vcpu: Vcpu, cmd: TdxCmd) -> int:
        """tdx_vcpu_init: x2APIC mode must be valid for the guest CPUID KVM holds; then
        TDH.VP.CREATE, TDH.VP.ADDCX and TDH.VP.INIT, which the simulated module grants."""
        if cmd.flags or vcpu.td_initialized:
            raise fail(errno.EINVAL)
        if not _x2apic_base_valid(vcpu.cpuid):
            raise fail(errno.EINVAL)
        vcpu.td_initialized = True
        return 0

    def agrees_with_td(self, vm: Vm, entries: tuple[CpuidEntry, ...]) -> bool:
        """Whether every entry of a KVM_SET_CPUID2 that names a CPUID_CONFIG row has that
        row's directly configurable bits as the TD has them (a validating kernel's rule)."""
        values, invalid = vm.cpuid, vm.faulting
        for row in self.module.td_conf.cpuid_config:
            sub = None if row.subleaf == NO_SUBLEAF else row.subleaf
            td = self.module.mng_rd_cpuid(values, invalid, row.leaf, sub)
            mine = next((e for e in entries if e.function == row.leaf and (
                sub is None or e.index == sub)), None)
            if td is None or mine is None:
                continue
            if any((a ^ b) & m for a, b, m in zip(mine.regs(), td, row.values, strict=True)):
                return False
        return True


def _get_cmd(arg: int) -> TdxCmd:
    """tdx_get_cmd: the command, refused when the caller set hw_error."""
    cmd = layout.unpack_cmd(copy_from_user(arg, layout.SIZEOF_TDX_CMD))
    if cmd.hw_error:
        raise fail(errno.EINVAL)
    return cmd


def _td_alive(vm: Vm) -> bool:
    """A TD vCPU's commands need a key ID and a TD not yet finalised (TD_STATE_RUNNABLE)."""
    return vm.key_id is not None and not vm.finalized


def _x2apic_base_valid(cpuid: tuple[CpuidEntry, ...]) -> bool:
    """kvm_apic_set_base(APIC_DEFAULT_PHYS_BASE | X2APIC | ENABLE, host_initiated): x2APIC
    must be in the guest's CPUID and the base below its MAXPHYADDR."""
    leaf1 = next((e for e in cpuid if e.function == 1), None)
    if leaf1 is None or not leaf1.ecx & X2APIC:
        return False
    return APIC_DEFAULT_PHYS_BASE >> _maxphyaddr(cpuid) == 0


def _maxphyaddr(cpuid: tuple[CpuidEntry, ...]) -> int:
    """cpuid_query_maxphyaddr: 0x80000008 EAX[7:0] when 0x80000000 reaches it, else 36."""
    top = next((e for e in cpuid if e.function == 0x80000000), None)
    ext = next((e for e in cpuid if e.function == 0x80000008), None)
    if top is None or top.eax < 0x80000008 or ext is None:
        return DEFAULT_MAXPHYADDR
    return ext.eax & 0xFF

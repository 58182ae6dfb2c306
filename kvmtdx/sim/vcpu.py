"""KVM's vCPUs: KVM_ENABLE_CAP (split irqchip), KVM_CREATE_VCPU and the vCPU ioctls.

Linux 7.3 virt/kvm/kvm_main.c (kvm_vm_ioctl_create_vcpu, kvm_vcpu_ioctl), arch/x86/kvm/x86.c
(kvm_vm_ioctl_enable_cap, kvm_arch_vcpu_precreate / _create, kvm_arch_vcpu_ioctl) and
cpuid.c (kvm_vcpu_ioctl_set_cpuid2 / _get_cpuid2, kvm_set_cpuid, kvm_check_cpuid,
kvm_update_cpuid_runtime), in their order and with their errnos.  A TD vCPU's
KVM_MEMORY_ENCRYPT_OP goes to `tdx_vcpu`.  A vCPU never runs here, so KVM_SET_CPUID2 is
always the "before KVM_RUN" kind, and nothing the sim cannot know (FPU permission for
dynamic XSAVE state) is granted.
"""

from __future__ import annotations

import errno
from dataclasses import replace

from kvmtdx import layout, uapi
from kvmtdx.sim import mutants
from kvmtdx.sim.mutants import Mutant
from kvmtdx.sim.state import Vcpu, Vm
from kvmtdx.sim.tdx_vcpu import TdxVcpu
from kvmtdx.sim.uaccess import copy_from_user, copy_to_user, fail
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, KVM_MAX_CPUID_ENTRIES, CpuidEntry

KVM_MAX_VCPU_IDS = 4096  # x86: KVM_MAX_VCPUS * 4 without CONFIG_KVM_MAX_NR_VCPUS raised
KVM_MAX_VCPUS = 1024
KVM_MAX_IRQ_ROUTES = 4096
APIC_BASE_ENABLE = 1 << 11
KVMIO = 0xAE
# Runtime CPUID bits (kvm_update_cpuid_runtime) at RESET: CR4 0, XCR0 = FP, XSS 0.
OSXSAVE, APIC, OSPKE, XSAVEC, XSAVES = 1 << 27, 1 << 9, 1 << 4, 1 << 1, 1 << 3
XSAVE_FP_ONLY_SIZE = 576  # legacy area (512) + XSAVE header (64)
XTILEDATA = 1 << 18  # XFEATURE_MASK_USER_DYNAMIC


class Vcpus:
    """vCPUs of every VM on the host; `tdx` answers a TD vCPU's TDX commands."""

    def __init__(self, tdx: TdxVcpu, bug: Mutant | None, present_cpus: int) -> None:
        self.tdx = tdx
        self.bug = bug
        self.present_cpus = present_cpus

    # ------------------------------------------------------------------
    # On the VM fd.

    def enable_cap(self, vm: Vm, arg: int) -> int:
        """KVM_ENABLE_CAP: only KVM_CAP_SPLIT_IRQCHIP is modelled; others -EINVAL."""
        cap = layout.unpack_enable_cap(copy_from_user(arg, layout.SIZEOF_ENABLE_CAP))
        if cap.flags or cap.cap != uapi.Cap.KVM_CAP_SPLIT_IRQCHIP:
            raise fail(errno.EINVAL)
        if cap.args[0] > KVM_MAX_IRQ_ROUTES:
            raise fail(errno.EINVAL)
        if vm.split_irqchip or vm.vcpu_ids:
            raise fail(errno.EEXIST)
        vm.split_irqchip = True
        return 0

    def create(self, vm: Vm, vcpu_id: int) -> Vcpu:
        """kvm_vm_ioctl_create_vcpu down to tdx_vcpu_create."""
        limit = min(KVM_MAX_VCPUS, self.present_cpus) if vm.is_td else KVM_MAX_VCPUS
        if vcpu_id >= KVM_MAX_VCPU_IDS or len(vm.vcpu_ids) >= limit:
            raise fail(errno.EINVAL)
        if vcpu_id in vm.vcpu_ids:
            raise fail(errno.EEXIST)
        if vm.is_td:
            if not vm.initialized:
                raise fail(errno.EIO)
            if not vm.split_irqchip and self.bug is not mutants.VCPU_WITHOUT_SPLIT_IRQCHIP:
                raise fail(errno.EINVAL)
        vm.vcpu_ids.add(vcpu_id)
        vm.refs += 1
        # kvm_create_lapic stuffs APIC ENABLE for an in-kernel local APIC (TDs always have one).
        return Vcpu(vm, vcpu_id, apic_base=APIC_BASE_ENABLE if vm.split_irqchip else 0)

    # ------------------------------------------------------------------
    # On the vCPU fd.

    def ioctl(self, vcpu: Vcpu, request: int, arg: int) -> int:
        """kvm_vcpu_ioctl: the unlocked TDX commands first, then the locked switch."""
        if vcpu.vm.dead:
            raise fail(errno.EIO)
        if request >> 8 & 0xFF != KVMIO:
            raise fail(errno.EINVAL)
        if request == uapi.Ioctl.KVM_MEMORY_ENCRYPT_OP:
            if not vcpu.vm.is_td:
                raise fail(errno.EINVAL)  # vt_vcpu_mem_enc_unlocked_ioctl: not a TD vCPU
            handled = self.tdx.unlocked(vcpu, arg)
            if handled is not None:
                return handled
            return self.tdx.locked(vcpu, arg)
        if request == uapi.Ioctl.KVM_SET_CPUID2:
            return self._set_cpuid2(vcpu, arg)
        if request == uapi.Ioctl.KVM_GET_CPUID2:
            return self._get_cpuid2(vcpu, arg)
        raise fail(errno.EINVAL)  # kvm_arch_vcpu_ioctl's default

    def _set_cpuid2(self, vcpu: Vcpu, arg: int) -> int:
        nent, _ = layout.unpack_cpuid2(copy_from_user(arg, layout.SIZEOF_CPUID2))
        if nent > KVM_MAX_CPUID_ENTRIES:
            raise fail(errno.E2BIG)
        entries = layout.unpack_cpuid2(copy_from_user(arg, layout.cpuid2_size(nent)))[1]
        _check_cpuid(entries)
        if self.bug is mutants.SET_CPUID2_CHECKED_AGAINST_TD and vcpu.vm.is_td \
                and not self.tdx.agrees_with_td(vcpu.vm, entries):
            raise fail(errno.EINVAL)
        vcpu.cpuid = entries
        return 0

    def _get_cpuid2(self, vcpu: Vcpu, arg: int) -> int:
        header = copy_from_user(arg, layout.SIZEOF_CPUID2)
        if layout.unpack_cpuid2(header)[0] < len(vcpu.cpuid):
            raise fail(errno.E2BIG)
        vcpu.cpuid = _runtime(vcpu)
        packed = layout.pack_entries(vcpu.cpuid)
        copy_to_user(arg + layout.SIZEOF_CPUID2, packed)
        # The header goes back as the caller sent it, nent replaced.
        copy_to_user(arg, len(vcpu.cpuid).to_bytes(4, "little") + header[4:])
        return 0


def _find(entries: tuple[CpuidEntry, ...], function: int, index: int | None) -> int | None:
    """kvm_find_cpuid_entry2's position: the first entry of the function that is unflagged or
    has the index (any entry of it when the index does not matter)."""
    for i, e in enumerate(entries):
        if e.function == function and (
                index is None or not e.flags & FLAG_SIGNIFICANT_INDEX or e.index == index):
            return i
    return None


def _check_cpuid(entries: tuple[CpuidEntry, ...]) -> None:
    """kvm_check_cpuid: a linear address width KVM cannot do, or dynamic XSAVE state the
    process has no guest permission for (the sim never grants it)."""
    i = _find(entries, 0x80000008, None)
    if i is not None and entries[i].eax >> 8 & 0xFF not in (0, 48, 57):
        raise fail(errno.EINVAL)
    j = _find(entries, 0xD, 0)
    if j is not None and entries[j].eax & XTILEDATA:
        raise fail(errno.EPERM)


def _runtime(vcpu: Vcpu) -> tuple[CpuidEntry, ...]:
    """kvm_update_cpuid_runtime on a vCPU at RESET: the bits KVM derives from its state."""
    out = list(vcpu.cpuid)
    i = _find(vcpu.cpuid, 1, None)
    if i is not None:
        e = out[i]
        apic = APIC if vcpu.apic_base & APIC_BASE_ENABLE else 0
        out[i] = replace(e, ecx=e.ecx & ~OSXSAVE, edx=e.edx & ~APIC | apic)
    i = _find(vcpu.cpuid, 7, 0)
    if i is not None:
        out[i] = replace(out[i], ecx=out[i].ecx & ~OSPKE)
    i = _find(vcpu.cpuid, 0xD, 0)
    if i is not None:
        out[i] = replace(out[i], ebx=XSAVE_FP_ONLY_SIZE)
    i = _find(vcpu.cpuid, 0xD, 1)
    if i is not None and out[i].eax & (XSAVEC | XSAVES):
        out[i] = replace(out[i], ebx=XSAVE_FP_ONLY_SIZE)
    return tuple(out)

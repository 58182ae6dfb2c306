"""KVM's ioctls on /dev/kvm and on VM fds (Linux 7.3 virt/kvm/kvm_main.c, arch/x86/kvm).

What is not TDX lives here: the API version, KVM_CHECK_EXTENSION, creating
VMs and KVM_GET_SUPPORTED_CPUID.  KVM_MEMORY_ENCRYPT_OP on a TD goes to `tdx`;
KVM_ENABLE_CAP, KVM_CREATE_VCPU and every vCPU ioctl to `vcpus`.  A VM lives while its
fd or one of its vCPUs' is open: the last close frees it (a TD's key ID with it).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from kvmtdx import layout, uapi
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.sim.state import File, System, Vcpu, Vm
from kvmtdx.sim.tdx import Tdx
from kvmtdx.sim.uaccess import copy_from_user, copy_to_user, fail
from kvmtdx.sim.vcpu import Vcpus
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, KVM_MAX_CPUID_ENTRIES, CpuidEntry

_API_VERSION = 12
_VM_TYPES = 1 << uapi.VmType.KVM_X86_DEFAULT_VM | 1 << uapi.VmType.KVM_X86_TDX_VM


class Kvm:
    """KVM on `host`; `install` turns a new kernel file into the caller's fd."""

    def __init__(self, host: Host, module: ModuleProfile, tdx: Tdx, vcpus: Vcpus,
                 install: Callable[[File], int]) -> None:
        self.tdx = tdx
        self.vcpus = vcpus
        self.install = install
        self.supported_cpuid = supported_cpuid(host, module)

    def ioctl(self, f: File, request: int, arg: int) -> int:
        """An ioctl on one of KVM's files."""
        if isinstance(f, System):
            return self._dev_ioctl(request, arg)
        if isinstance(f, Vcpu):
            return self.vcpus.ioctl(f, request, arg)
        return self._vm_ioctl(f, request, arg)

    def release(self, f: File) -> None:
        """An fd was closed: a vCPU's holds a reference on its VM, which goes with the last."""
        vm = f.vm if isinstance(f, Vcpu) else f
        if not isinstance(vm, Vm):
            return
        vm.refs -= 1
        if vm.refs == 0 and vm.is_td:
            self.tdx.vm_destroy(vm)

    def _dev_ioctl(self, request: int, arg: int) -> int:
        """An ioctl on /dev/kvm (kvm_dev_ioctl)."""
        if request == uapi.Ioctl.KVM_GET_API_VERSION:
            if arg:
                raise fail(errno.EINVAL)
            return _API_VERSION
        if request == uapi.Ioctl.KVM_CHECK_EXTENSION:
            return _check_extension(arg)
        if request == uapi.Ioctl.KVM_CREATE_VM:
            if arg not in (uapi.VmType.KVM_X86_DEFAULT_VM, uapi.VmType.KVM_X86_TDX_VM):
                raise fail(errno.EINVAL)
            return self.install(Vm(vm_type=arg))
        if request == uapi.Ioctl.KVM_GET_SUPPORTED_CPUID:
            return self._get_supported_cpuid(arg)
        raise fail(errno.ENOTTY)

    def _vm_ioctl(self, vm: Vm, request: int, arg: int) -> int:
        """An ioctl on a VM fd (kvm_vm_ioctl)."""
        if vm.dead:
            raise fail(errno.EIO)  # kvm->vm_dead: refused before the ioctl is even looked at
        if request == uapi.Ioctl.KVM_CHECK_EXTENSION:
            return _check_extension(arg)
        if request == uapi.Ioctl.KVM_CREATE_VCPU:
            return self.install(self.vcpus.create(vm, arg))
        if request == uapi.Ioctl.KVM_ENABLE_CAP:
            return self.vcpus.enable_cap(vm, arg)
        if request == uapi.Ioctl.KVM_MEMORY_ENCRYPT_OP and vm.is_td:
            return self.tdx.memory_encrypt_op(vm, arg)
        raise fail(errno.ENOTTY)

    def _get_supported_cpuid(self, arg: int) -> int:
        return get_supported_cpuid(self.supported_cpuid, arg)

def _check_extension(cap: int) -> int:
    return _VM_TYPES if cap == uapi.KVM_CAP_VM_TYPES else 0


def get_supported_cpuid(entries: tuple[CpuidEntry, ...], arg: int) -> int:
    """KVM_GET_SUPPORTED_CPUID of `entries` into the caller's kvm_cpuid2 at `arg`.

    KVM's common code, not TDX's: the kernel-source host answers it with this too.
    """
    # Linux cpuid.c: the header is read, a too small nent is E2BIG with
    # nothing written back; nent is clamped to KVM_MAX_CPUID_ENTRIES.
    nent, _ = layout.unpack_cpuid2(copy_from_user(arg, layout.SIZEOF_CPUID2))
    if nent < 1:
        raise fail(errno.E2BIG)
    if len(entries) > min(nent, KVM_MAX_CPUID_ENTRIES):
        raise fail(errno.E2BIG)
    packed = layout.pack_cpuid2(entries)
    copy_to_user(arg + layout.SIZEOF_CPUID2, packed[layout.SIZEOF_CPUID2:])
    # The header goes back with the caller's own padding: only nent changes.
    copy_to_user(arg, packed[: layout.OFFSET_CPUID2_PADDING])
    return 0


def supported_cpuid(host: Host, module: ModuleProfile) -> tuple[CpuidEntry, ...]:
    """What KVM_GET_SUPPORTED_CPUID lists: the host's leaves (the module's rows, zero, for a
    host that names none)."""
    leaves = host.native if host.native else {(r.leaf, r.subleaf) for r in module.rows}
    # A leaf without sub-leaves sorts before its sub-leaf 0.
    keys = sorted(leaves, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    out = []
    for leaf, sub in keys:
        a, b, c, d = host.cpuid(leaf, sub)
        out.append(CpuidEntry(
            function=leaf, index=0 if sub is None else sub,
            flags=0 if sub is None else FLAG_SIGNIFICANT_INDEX,
            eax=a, ebx=b, ecx=c, edx=d,
        ))
    return tuple(out)

"""A TD's vCPU path as Linux 7.3 answers it, past the TD's CPUID itself (`get_cpuid`).

Pure code.  What a VMM does after KVM_TDX_INIT_VM to learn and hand on the TD's CPUID, with
the errnos and buffers Linux 7.3 gives (arch/x86/kvm/x86.c kvm_vm_ioctl_enable_cap,
virt/kvm/kvm_main.c kvm_vm_ioctl, kvm_vm_ioctl_create_vcpu, arch/x86/kvm/vmx/tdx.c
tdx_vcpu_create, tdx_vcpu_get_cpuid, arch/x86/kvm/cpuid.c kvm_set_cpuid, kvm_check_cpuid):

- KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP) on a VM without an irqchip or vCPUs: 0 (a bugged
  VM: -EIO, as every VM ioctl);
- KVM_CREATE_VCPU on a TD: -EIO until INIT_VM succeeded, -EINVAL without a split irqchip
  (the TDX module needs APICv, so an in-kernel local APIC, and KVM refuses an in-kernel I/O
  APIC);
- KVM_TDX_GET_CPUID: the header (nent, padding) copied in, the leaves walked, the count
  written back to nent with the caller's padding; too little room is -E2BIG with no entry
  written; a refused leaf 0 or 0x80000000 is -EIO with nothing written;
- KVM_SET_CPUID2 on a TD vCPU is KVM's generic code, with no TD path: -E2BIG past 256
  entries, -EINVAL for a linear address width (0x80000008 EAX[15:8]) other than 0, 48 or
  57, -EPERM for dynamic XSAVE state (AMX tile data in 0xD.0) the process has no guest FPU
  permission for, and anything else taken, whatever the TD's CPUID says.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence

from kvmtdx import layout
from kvmtdx.model.mirror_kvm import find
from kvmtdx.structs import KVM_MAX_CPUID_ENTRIES, REGISTERS, CpuidEntry

XTILEDATA = 1 << 18  # CPUID 0xD.0 EAX: XFEATURE_MASK_USER_DYNAMIC, AMX tile data
LINEAR_WIDTHS = (0, 48, 57)
LA_BITS_SHIFT = 8


def split_irqchip_errno(*, dead: bool) -> int:
    """KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP), the VM's first (no irqchip, no vCPU yet)."""
    return errno.EIO if dead else 0


def create_vcpu_errno(*, dead: bool, initialized: bool, split: bool) -> int:
    """KVM_CREATE_VCPU of a TD's first vCPU (tdx_vcpu_create's two checks, in its order)."""
    if dead or not initialized:
        return errno.EIO
    return 0 if split else errno.EINVAL


def get_cpuid_answer(entries: Sequence[CpuidEntry] | None, buffer: bytes) -> tuple[int, bytes]:
    """KVM_TDX_GET_CPUID's errno and the caller's struct kvm_cpuid2 after it, given the buffer
    before it and the entries the walk gives (None: -EIO)."""
    if entries is None:
        return errno.EIO, buffer
    room = layout.unpack_cpuid2_header(buffer)[0]
    header = len(entries).to_bytes(4, "little") + buffer[4:layout.SIZEOF_CPUID2]
    rest = buffer[layout.SIZEOF_CPUID2:]
    if room < len(entries):
        return errno.E2BIG, header + rest
    written = layout.pack_entries(tuple(entries))
    return 0, header + written + rest[len(written):]


def set_cpuid2_errno(entries: Sequence[CpuidEntry]) -> int:
    """KVM_SET_CPUID2 on a vCPU that has not run, from a process without guest FPU
    permission for dynamic XSAVE state."""
    if len(entries) > KVM_MAX_CPUID_ENTRIES:
        return errno.E2BIG
    ext = find(entries, 0x80000008, None)
    if ext is not None and ext.eax >> LA_BITS_SHIFT & 0xFF not in LINEAR_WIDTHS:
        return errno.EINVAL
    xsave = find(entries, 0xD, 0)
    if xsave is not None and xsave.eax & XTILEDATA:
        return errno.EPERM
    return 0


def without_dynamic_xsave(entries: Iterable[CpuidEntry]) -> tuple[CpuidEntry, ...]:
    """The TD's CPUID as a process that has not asked for AMX guest permission (arch_prctl
    ARCH_REQ_XCOMP_GUEST_PERM) hands it to KVM_SET_CPUID2: XTILEDATA left out of 0xD.0."""
    return tuple(e.with_reg("eax", e.eax & ~XTILEDATA) if (e.function, e.index) == (0xD, 0)
                 else e for e in entries)


def with_bit(entries: Iterable[CpuidEntry], leaf: int, subleaf: int | None, register: str,
             bit: int, on: bool) -> tuple[CpuidEntry, ...]:
    """`entries` with one bit set (`on`) or cleared in the entry of (leaf, sub-leaf), as
    KVM_TDX_GET_CPUID gives them (an entry read without a sub-leaf stands for every one)."""
    if register not in REGISTERS:
        raise ValueError(f"not a CPUID register: {register}")
    mask = 1 << bit

    def told(e: CpuidEntry) -> CpuidEntry:
        value = e.reg(register)
        return e.with_reg(register, value | mask if on else value & ~mask)

    return tuple(told(e) if e.function == leaf and (
        subleaf is None or not e.significant_index or e.index == subleaf) else e
        for e in entries)

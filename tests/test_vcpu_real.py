"""The vCPU half of the device layer on this machine's real /dev/kvm, on an ordinary VM.

What needs no TDX: KVM_CAP_SPLIT_IRQCHIP, KVM_CREATE_VCPU, KVM_SET_CPUID2 / KVM_GET_CPUID2 and
the errnos of their refusals (Linux virt/kvm/kvm_main.c kvm_vm_ioctl_create_vcpu, arch/x86/kvm
x86.c kvm_vm_ioctl_enable_cap, cpuid.c kvm_vcpu_ioctl_set_cpuid2, kvm_check_cpuid).  The
no_fd_leak fixture proves every vCPU and VM fd is closed.  The TD half is in test_tdx_host.py.
"""

from __future__ import annotations

import errno

import pytest

from kvmtdx import layout
from kvmtdx.device import Kvm
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, CpuidEntry, EnableCap
from kvmtdx.uapi import Cap

pytestmark = [pytest.mark.realkvm, pytest.mark.usefixtures("real_kvm", "no_fd_leak")]

# Leaves this and every KVM keep as set: none of the bits kvm_update_cpuid_runtime rewrites
# (leaf 1 OSXSAVE/APIC/MWAIT, 7.0 OSPKE, 0xD sizes) and a 48-bit linear address width.
ROUND_TRIP = (
    CpuidEntry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
    CpuidEntry(4, 0, FLAG_SIGNIFICANT_INDEX, 0x121, 0x1C0003F, 0x3F, 0),
    CpuidEntry(4, 1, FLAG_SIGNIFICANT_INDEX, 0x122, 0x1C0003F, 0x3F, 0),
    CpuidEntry(0x80000000, 0, 0, 0x80000008),
    CpuidEntry(0x80000008, 0, 0, 0x3030),
)


def test_split_irqchip_once_and_only_before_vcpus() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.enable_split_irqchip()
        with pytest.raises(OSError) as again:
            vm.enable_split_irqchip()
        assert again.value.errno == errno.EEXIST
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0):
        with pytest.raises(OSError) as late:
            vm.enable_split_irqchip()
        assert late.value.errno == errno.EEXIST


def test_enable_cap_flags_refused() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, pytest.raises(OSError) as e:
        vm.enable_cap(EnableCap(Cap.KVM_CAP_SPLIT_IRQCHIP, flags=1, args=(24, 0, 0, 0)))
    assert e.value.errno == errno.EINVAL


def test_create_vcpus_counted_and_closed() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.enable_split_irqchip()
        with vm.create_vcpu(0) as a, vm.create_vcpu(1) as b:
            assert a.fd is not None and b.fd is not None and a.fd != b.fd
            assert (a.vcpu_id, b.vcpu_id) == (0, 1)
            with pytest.raises(OSError) as dup:
                vm.create_vcpu(0)
            assert dup.value.errno == errno.EEXIST
        assert a.fd is None and b.fd is None
        assert kvm.counters.vcpus_created == 2
    assert kvm.counters.opens == kvm.counters.closes == 4


def test_a_fresh_vcpu_has_no_cpuid() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as v:
        assert v.get_cpuid2() == ()


def test_set_get_cpuid2_round_trip() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as v:
        assert v.set_cpuid2(ROUND_TRIP) == 0
        assert v.get_cpuid2() == ROUND_TRIP


def test_get_cpuid2_too_small_is_e2big_then_grown() -> None:
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as v:
        assert v.set_cpuid2(ROUND_TRIP) == 0
        err, data = v.get_cpuid2_raw(len(ROUND_TRIP) - 1)
        assert err == errno.E2BIG
        # KVM copies nothing back on E2BIG: the header still says what the caller sent.
        assert layout.unpack_cpuid2(data)[0] == len(ROUND_TRIP) - 1
        assert v.get_cpuid2(start_nent=1) == ROUND_TRIP


def test_set_cpuid2_refusals_keep_the_old_cpuid() -> None:
    bad_width = (*ROUND_TRIP[:-1], CpuidEntry(0x80000008, 0, 0, 0x2830))  # 40-bit linear
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as v:
        assert v.set_cpuid2(ROUND_TRIP) == 0
        assert v.set_cpuid2(bad_width) == errno.EINVAL
        assert v.set_cpuid2(ROUND_TRIP, nent=257) == errno.E2BIG
        assert v.get_cpuid2() == ROUND_TRIP


def test_tdx_vcpu_commands_refused_on_an_ordinary_vcpu() -> None:
    # kvm_intel with TDX built answers -EINVAL (vt_vcpu_mem_enc_*ioctl: not a TD vCPU); a
    # KVM without vCPU encryption ops (kvm_amd, or no CONFIG_KVM_INTEL_TDX) -ENOTTY.
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as v:
        got = v.tdx_get_cpuid_raw(8)
        init = v.tdx_init_vcpu()
    assert got.errno in (errno.EINVAL, errno.ENOTTY)
    assert init.errno == got.errno


def test_td_cpuid_without_tdx_skips_naming_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import run_cli

    from kvmtdx.device import tdx_status

    if tdx_status().available:
        pytest.skip("this host offers KVM_X86_TDX_VM (test_tdx_host.py covers it)")
    r = run_cli(capsys, "td-cpuid")
    assert r.rc == 4 and r.out == ""
    assert r.err.count("\n") == 1 and "KVM_X86_TDX_VM" in r.err and "--simulate" in r.err

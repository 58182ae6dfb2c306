"""KVM_TDX_INIT_VM through the seam, where the simulated TDX module decides.

What Linux 7.3's __tdx_td_init does with TDH.MNG.INIT's status (arch/x86/kvm/vmx/tdx.c):
TDX_OPERAND_INVALID is -EINVAL with the status in hw_error; anything else is
TDX_BUG_ON_1 -> a WARN, "SEAMCALL TDH_MNG_INIT failed: 0x<status>, rcx 0x<rcx>" in the
log, the VM marked bugged (kvm_vm_ioctl answers -EIO to everything on it after that,
virt/kvm/kvm_main.c) and -EIO with hw_error left 0.  Both paths tear the TD down, so
its TDX key ID is freed at once.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import replace

import pytest
from helpers import bypass

from kvmtdx import uapi
from kvmtdx.device import Kvm
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.sim import SimulatedHost

MODULE = load_profile("2.0")
# A host without IA32_ARCH_CAPABILITIES.TSX_CTRL: virtual TSX is TDX_INCORRECT_MSR_VALUE.
NO_TSX_CTRL = replace(MAX_HOST, name="no-tsx-ctrl", tsx_ctrl=False)
HLE_RTM = 1 << 4 | 1 << 11
INCORRECT_MSR_VALUE_TSX = 0xC00009210000010A


def sim(policy: str = "upstream", mutant: str | None = None) -> SimulatedHost:
    return SimulatedHost(MODULE, NO_TSX_CTRL, get_policy(policy), mutant=mutant, key_ids=4)


@pytest.fixture
def host(no_fd_leak: object) -> Iterator[SimulatedHost]:
    s = sim()
    yield s
    assert s.open_fds == () and s.free_key_ids == 4


def test_a_non_operand_status_is_eio_a_warn_and_a_bugged_vm(host: SimulatedHost) -> None:
    smuggled = bypass(ebx=HLE_RTM, ecx=0)  # the denylist bypass carries HLE+RTM to row 7.0
    with Kvm(host) as kvm, kvm.create_td() as td:
        first = td.init_vm_raw(smuggled)
        assert (first.errno, first.cmd.hw_error) == (errno.EIO, 0)
        assert host.kernel_warnings == 1
        (event,) = host.kernel_log.events
        assert event.line == ("kvm_intel: SEAMCALL TDH_MNG_INIT failed: "
                              "0xc00009210000010a, rcx 0x0")
        assert (event.status, event.rcx, event.splat, event.vm_dead) == (
            INCORRECT_MSR_VALUE_TSX, 0, True, True)
        assert host.free_key_ids == 4  # torn down: the key ID is back at once
        # Every later ioctl on the VM fd: -EIO, before the kernel even looks at it.
        assert td.init_vm_raw(bypass(ecx=0)).errno == errno.EIO
        assert td.capabilities_raw(64).errno == errno.EIO
        for request, arg in ((uapi.Ioctl.KVM_CHECK_EXTENSION, uapi.KVM_CAP_VM_TYPES),
                             (0xAEFF, 0)):
            with pytest.raises(OSError) as info:
                td.ioctl(request, arg)
            assert info.value.errno == errno.EIO
        # /dev/kvm and other VMs are not affected.
        assert kvm.api_version() == 12
        with kvm.create_td() as other:
            assert other.init_vm(bypass(ecx=0)).errno == 0
    assert host.kernel_warnings == 1


def test_warn_on_once_prints_once_but_every_failure_counts(host: SimulatedHost) -> None:
    with Kvm(host) as kvm:
        for _ in range(2):
            with kvm.create_td() as td:
                assert td.init_vm_raw(bypass(ebx=HLE_RTM, ecx=0)).errno == errno.EIO
    assert host.kernel_warnings == 2
    assert [e.splat for e in host.kernel_log.events] == [True, False]


def test_linux_6_16_warns_but_leaves_the_vm_usable(no_fd_leak: object) -> None:
    s = sim("upstream-6.16")
    with Kvm(s) as kvm, kvm.create_td() as td:
        assert td.init_vm_raw(bypass(ebx=HLE_RTM, ecx=0)).errno == errno.EIO
        assert s.kernel_warnings == 1 and not s.kernel_log.events[0].vm_dead
        assert td.init_vm(bypass(ecx=0)).errno == 0  # the TD takes another INIT_VM


def test_an_operand_status_is_einval_with_hw_error_and_no_warn(host: SimulatedHost) -> None:
    with Kvm(host) as kvm, kvm.create_td() as td:
        res = td.init_vm_raw(bypass(ebx=1 << 4, ecx=0))  # HLE without RTM: CPUID_CONFIG
        assert (res.errno, res.cmd.hw_error) == (errno.EINVAL, 0xC000010000000045)
        assert host.kernel_warnings == 0
        # The TD is still uninitialised and usable: a valid INIT_VM goes through.
        assert td.init_vm(bypass(ecx=0)).errno == 0


def test_the_mutant_maps_every_status_to_einval() -> None:
    s = sim(mutant="module_status_always_einval")
    with Kvm(s) as kvm, kvm.create_td() as td:
        res = td.init_vm_raw(bypass(ebx=HLE_RTM, ecx=0))
        assert (res.errno, res.cmd.hw_error) == (errno.EINVAL, INCORRECT_MSR_VALUE_TSX)
        assert s.kernel_warnings == 0
        assert td.init_vm(bypass(ecx=0)).errno == 0  # not dead

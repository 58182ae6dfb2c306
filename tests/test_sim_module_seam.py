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
from kvmtdx.model import mirror
from kvmtdx.model.policy import Policy, get_policy
from kvmtdx.model.profiles import MAX_HOST, Host, load_profile
from kvmtdx.sim import SimulatedHost
from kvmtdx.sim.state import KernelLog, Vm
from kvmtdx.structs import InitVm

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


# ---------------------------------------------------------------------------
# The cases, KVM and the simulated module together, on the bundled 'max' host.


def _with(iv: InitVm, leaf: int, index: int, register: str, *, set_bits: int = 0,
          clear: int = 0) -> InitVm:
    return replace(iv, entries=tuple(
        e.with_reg(register, e.reg(register) & ~clear | set_bits)
        if (e.function, e.index) == (leaf, index) else e for e in iv.entries))


def _topology(iv: InitVm, levels: list[tuple[int, int, int, int]]) -> InitVm:
    """Leaf 0x1F sub-leaves 0.. as given (the rest stay as the request has them: zero)."""
    for s, (a, b, c, d) in enumerate(levels):
        iv = replace(iv, entries=tuple(
            replace(e, eax=a, ebx=b, ecx=c, edx=d) if (e.function, e.index) == (0x1F, s)
            else e for e in iv.entries))
    return iv


def full(policy: str = "upstream", host: Host = MAX_HOST) -> InitVm:
    return mirror.full_request(MODULE, host, get_policy(policy)).init_vm


def on(host: Host = MAX_HOST, policy: Policy | str = "upstream") -> SimulatedHost:
    p = get_policy(policy) if isinstance(policy, str) else policy
    return SimulatedHost(MODULE, host, p, key_ids=4)


def attempt(s: SimulatedHost, iv: InitVm) -> tuple[int, int, dict[tuple[int, int | None],
                                                              tuple[int, int, int, int]]]:
    """(errno, hw_error, the TD's CPUID as the module left it, {} unless accepted)."""
    with Kvm(s) as kvm, kvm.create_td() as td:
        res = td.init_vm_raw(iv)
        assert td.fd is not None
        return res.errno, res.cmd.hw_error, dict(s.vm_state(td.fd).cpuid)


AVX512F = 1 << 16
LEVEL_SMT = (1, 2, 0 | 1 << 8, 0)
LEVEL_CORE = (7, 0x70, 1 | 2 << 8, 0)


def test_avx512f_without_its_xfam_state_is_accepted_and_cleared() -> None:
    iv = replace(_with(full(), 7, 0, "ebx", set_bits=AVX512F), xfam=0x3)
    err, hw, cpuid = attempt(on(), iv)
    assert (err, hw) == (0, 0)
    assert not cpuid[(7, 0)][1] & AVX512F
    assert attempt(on(), _with(full(), 7, 0, "ebx", set_bits=AVX512F))[2][(7, 0)][1] & AVX512F


@pytest.mark.parametrize("xfam", [0x23, 0xE3, 0x20003, 0x803])
def test_xfam_combinations_the_module_refuses(xfam: int) -> None:
    assert attempt(on(), replace(full(), xfam=xfam))[:2] == (errno.EINVAL, 0xC000010000000041)


@pytest.mark.parametrize("levels", [[(0, 0, 0, 0), LEVEL_CORE], [LEVEL_SMT, (0, 0, 1, 0)]],
                         ids=["sub-leaf-0-zero-then-set", "no-core-level"])
def test_a_malformed_topology_is_eio_a_warn_and_a_dead_vm(
        levels: list[tuple[int, int, int, int]]) -> None:
    s = on()
    with Kvm(s) as kvm, kvm.create_td() as td:
        res = td.init_vm_raw(_topology(full(), levels))
        assert (res.errno, res.cmd.hw_error) == (errno.EIO, 0)
        assert td.init_vm_raw(full()).errno == errno.EIO  # dead
    assert s.kernel_warnings == 1
    assert s.kernel_log.events[0].line.endswith("failed: 0xc000090400000000, rcx 0x0")
    assert s.free_key_ids == 4


def test_a_valid_topology_is_taken_and_0b_derived() -> None:
    err, _, cpuid = attempt(on(), _topology(full(), [LEVEL_SMT, LEVEL_CORE, (0, 0, 2, 0)]))
    assert err == 0 and cpuid[(0x1F, 1)] == LEVEL_CORE and cpuid[(0xB, 0)] == LEVEL_SMT


def _without_tsx(host: Host) -> Host:
    native = dict(host.native)
    a, b, c, d = native[(7, 0)]
    native[(7, 0)] = (a, b & ~HLE_RTM, c, d)
    return replace(host, name="no-tsx", native=native, tsx_ctrl=False)


def test_hle_rtm_on_a_host_without_them_are_accepted_and_cleared() -> None:
    host = _without_tsx(MAX_HOST)
    err, hw, cpuid = attempt(on(host), bypass(full(host=host), ebx=HLE_RTM, ecx=0))
    assert (err, hw) == (0, 0)
    assert not cpuid[(7, 0)][1] & HLE_RTM


def test_hle_rtm_without_tsx_ctrl_under_a_policy_that_allows_them() -> None:
    """Where KVM lets HLE and RTM through by itself (an allowlist with them), the module's
    TDX_INCORRECT_MSR_VALUE is a WARN, no bypass needed."""
    rfc = get_policy("rfc-v2")
    assert rfc.allowlist is not None
    allowed = dict(rfc.allowlist.allowed)
    allowed[(7, 0, "ebx")] = allowed.get((7, 0, "ebx"), 0) | HLE_RTM
    policy = rfc.with_allowlist(replace(rfc.allowlist, allowed=allowed))
    s = on(NO_TSX_CTRL, policy)
    iv = _with(full("rfc-v2", NO_TSX_CTRL), 7, 0, "ebx", set_bits=HLE_RTM)
    assert attempt(s, iv)[:2] == (errno.EIO, 0)
    assert s.kernel_warnings == 1
    assert s.kernel_log.events[0].status == INCORRECT_MSR_VALUE_TSX


def test_pks_is_the_attributes_not_the_cpu() -> None:
    assert MAX_HOST.cpuid(7, 0)[2] >> 31  # the CPU has PKS
    assert not attempt(on(), full())[2][(7, 0)][2] >> 31  # the TD (ATTRIBUTES.PKS 0) not


def test_the_topology_check_comes_after_every_entry() -> None:
    """A bit outside row 0x23.0's masks (cpuid_lookup entry 59) is refused before the
    malformed 0x1F (checked once the loop is done): -EINVAL, not -EIO."""
    iv = _with(_topology(full(), [(0, 0, 0, 0), LEVEL_CORE]), 0x23, 0, "ebx", set_bits=1 << 31)
    assert attempt(on(), iv)[:2] == (errno.EINVAL, 0xC000010000000045)


def test_the_kernel_log_counts_every_warn_but_keeps_only_the_first() -> None:
    log = KernelLog()
    for n in range(KernelLog.KEPT + 5):
        log.tdx_bug_on("TDH_MNG_INIT", 0xC000090400000000, n, Vm(vm_type=5), kills_vm=True)
    assert log.warnings == KernelLog.KEPT + 5
    assert len(log.events) == KernelLog.KEPT
    assert [e.splat for e in log.events[:2]] == [True, False]

"""The simulated host's vCPU path answers as Linux 7.3 does, in its order, with its errnos.

KVM_CREATE_VCPU on a TD needs an initialised TD (-EIO) and a split irqchip (-EINVAL);
KVM_TDX_GET_CPUID walks the TD's leaves through the simulated module and tells the room it
needs on E2BIG; KVM_TDX_INIT_VCPU needs x2APIC in the CPUID KVM_SET_CPUID2 gave; a VM
lives until its last vCPU fd is closed.  The TD's CPUID the simulated host reports must be
the mirror's (kvmtdx.model.get_cpuid), which never saw the simulation's code: for every
bundled module and policy, and for random accepted requests.
"""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest
from helpers import bypass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sim_crosscheck import HOSTS, combo, requests

from kvmtdx import layout, uapi
from kvmtdx.device import Kvm, TdxVm, Vcpu
from kvmtdx.model import mirror
from kvmtdx.model.get_cpuid import TdCpuid, get_cpuid
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Kind
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import CpuidEntry, InitVm, TdxCmd

MODULE = load_profile("2.0")
WAITPKG, X2APIC, XTILEDATA = 1 << 5, 1 << 21, 1 << 18


def sim(policy: str = "rfc-v2", module: str = "2.0") -> SimulatedHost:
    return SimulatedHost(load_profile(module), MAX_HOST, get_policy(policy), key_ids=4)


def full(policy: str = "rfc-v2", module: str = "2.0") -> InitVm:
    return mirror.full_request(load_profile(module), MAX_HOST, get_policy(policy)).init_vm


def with_gpaw(iv: InitVm, gpaw: int) -> InitVm:
    return replace(iv, entries=tuple(replace(e, eax=e.eax & ~0xFF0000 | gpaw << 16)
                                     if e.function == 0x80000008 else e for e in iv.entries))


def predicted(policy: str, module: str, req: InitVm, gpaw: int = 48
              ) -> tuple[CpuidEntry, ...] | None:
    m = load_profile(module)
    p = mirror.init_vm_prediction(m, MAX_HOST, get_policy(policy), Request(init_vm=req))
    assert p.effective is not None
    return get_cpuid(TdCpuid(m.tables, p.effective, p.faulting), gpaw)


def td_vcpu(kvm: Kvm, req: InitVm) -> tuple[TdxVm, Vcpu]:
    td = kvm.create_td()
    assert td.init_vm(req).kind is Kind.ACCEPTED
    td.enable_split_irqchip()
    return td, td.create_vcpu(0)


def quirk_free(entries: tuple[CpuidEntry, ...]) -> tuple[CpuidEntry, ...]:
    """The TD's CPUID as a VMM hands it to KVM_SET_CPUID2, less AMX tile data (dynamic XSAVE
    state, which needs a guest FPU permission the process has not asked for)."""
    return tuple(e.with_reg("eax", e.eax & ~XTILEDATA) if (e.function, e.index) == (0xD, 0)
                 else e for e in entries)


# ---------------------------------------------------------------------------
# Creating vCPUs.


def test_a_td_vcpu_needs_an_initialised_td_then_a_split_irqchip() -> None:
    s = sim()
    with Kvm(s) as kvm, kvm.create_td() as td:
        with pytest.raises(OSError) as early:
            td.create_vcpu(0)
        assert early.value.errno == errno.EIO  # tdx_vcpu_create: TD not initialised
        td.enable_split_irqchip()
        with pytest.raises(OSError) as still:
            td.create_vcpu(0)
        assert still.value.errno == errno.EIO
    with Kvm(s) as kvm, kvm.create_td() as td:
        assert td.init_vm(full()).kind is Kind.ACCEPTED
        with pytest.raises(OSError) as no_split:
            td.create_vcpu(0)
        assert no_split.value.errno == errno.EINVAL
        td.enable_split_irqchip()
        with td.create_vcpu(0) as v, pytest.raises(OSError) as dup:
            td.create_vcpu(0)
        assert dup.value.errno == errno.EEXIST and v.fd is None
        with pytest.raises(OSError) as too_big:
            td.create_vcpu(4096)
        assert too_big.value.errno == errno.EINVAL
    assert s.open_fds == ()


def test_split_irqchip_once_and_before_any_vcpu() -> None:
    with Kvm(sim()) as kvm, kvm.create_vm() as vm:
        vm.enable_split_irqchip()
        with pytest.raises(OSError) as again:
            vm.enable_split_irqchip()
        assert again.value.errno == errno.EEXIST
    with Kvm(sim()) as kvm, kvm.create_vm() as vm, vm.create_vcpu(0):
        with pytest.raises(OSError) as late:
            vm.enable_split_irqchip()
        assert late.value.errno == errno.EEXIST
    with Kvm(sim()) as kvm, kvm.create_vm() as vm, pytest.raises(OSError) as routes:
        vm.enable_split_irqchip(4097)  # more than KVM_MAX_IRQ_ROUTES
    assert routes.value.errno == errno.EINVAL


def test_the_td_and_its_key_id_live_until_the_last_vcpu_closes() -> None:
    s = sim()
    with Kvm(s) as kvm:
        td, v = td_vcpu(kvm, full())
        td.close()
        assert s.free_key_ids == 3 and s.live_vcpus == 1 and s.live_tds == 0
        assert v.tdx_get_cpuid()  # the vCPU still reaches its TD
        v.close()
    assert s.free_key_ids == 4 and s.open_fds == ()


# ---------------------------------------------------------------------------
# KVM_TDX_GET_CPUID.


@pytest.mark.parametrize("module", BUNDLED_MODULES)
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_get_cpuid_is_the_mirrors_on_every_bundled_module(module: str, policy: str) -> None:
    req = full(policy, module)
    with Kvm(sim(policy, module)) as kvm:
        td, v = td_vcpu(kvm, req)
        with td, v:
            got = v.tdx_get_cpuid()
    assert got == predicted(policy, module, req)
    assert got[0].function == 0 and got[-1].function == 0x80000008


def test_get_cpuid_reports_the_gpaw_in_0x80000008() -> None:
    for gpaw in (48, 52):
        req = with_gpaw(full(), gpaw)
        with Kvm(sim()) as kvm:
            td, v = td_vcpu(kvm, req)
            with td, v:
                got = v.tdx_get_cpuid()
        assert got == predicted("rfc-v2", "2.0", req, gpaw)
        assert got[-1].eax >> 16 & 0xFF == gpaw


def test_get_cpuid_e2big_says_the_room_and_writes_no_entry() -> None:
    with Kvm(sim()) as kvm:
        td, v = td_vcpu(kvm, full())
        with td, v:
            count = len(v.tdx_get_cpuid())
            fill = (count - 1).to_bytes(4, "little") + b"\x5a" * 4 \
                + b"\xa5" * (layout.SIZEOF_CPUID_ENTRY2 * (count - 1))
            res = v.tdx_get_cpuid_raw(0, fill=fill)
            assert res.errno == errno.E2BIG
            # The header goes back with the count and the caller's padding; nothing else.
            assert res.data == count.to_bytes(4, "little") + fill[4:]
            assert v.tdx_get_cpuid_raw(0).data[:4] == count.to_bytes(4, "little")
            assert v.tdx_get_cpuid(start_nent=1) == v.tdx_get_cpuid()


def test_get_cpuid_refusals_and_no_write_back() -> None:
    with Kvm(sim()) as kvm:
        td, v = td_vcpu(kvm, full())
        with td, v:
            assert v.tdx_get_cpuid_raw(128, hw_error=1).errno == errno.EINVAL
            # cmd.flags is not checked, and kvm_tdx_cmd is never written back.
            flagged = v.tdx_get_cpuid_raw(128, flags=7)
            assert flagged.ok and flagged.cmd.flags == 7
            bad_id = v.memory_encrypt_op(TdxCmd(id=uapi.TdxCommand.KVM_TDX_CAPABILITIES), None)
            assert bad_id.errno == errno.EINVAL
            assert v.memory_encrypt_op(TdxCmd(id=5), None, cmd_address=8).errno == errno.EFAULT
            assert v.memory_encrypt_op(TdxCmd(id=5, data=8), None).errno == errno.EFAULT


def test_a_finalised_td_answers_no_vcpu_command() -> None:
    with Kvm(sim()) as kvm:
        td, v = td_vcpu(kvm, full())
        with td, v:
            fin = td.memory_encrypt_op(TdxCmd(id=uapi.TdxCommand.KVM_TDX_FINALIZE_VM), None)
            assert fin.ok
            assert v.tdx_get_cpuid_raw(128).errno == errno.EINVAL
            assert v.tdx_init_vcpu().errno == errno.EINVAL


def test_the_bypass_reaches_the_td() -> None:
    """Upstream's denylist bypass: WAITPKG is in the TD's CPUID, not only accepted."""
    req = bypass(full("upstream"))
    with Kvm(sim("upstream")) as kvm:
        td, v = td_vcpu(kvm, req)
        with td, v:
            leaf7 = next(e for e in v.tdx_get_cpuid() if (e.function, e.index) == (7, 0))
    assert leaf7.ecx & WAITPKG


# ---------------------------------------------------------------------------
# KVM_SET_CPUID2, KVM_GET_CPUID2 and KVM_TDX_INIT_VCPU on a TD vCPU.


def test_init_vcpu_needs_x2apic_in_the_cpuid_kvm_was_given() -> None:
    with Kvm(sim()) as kvm:
        td, v = td_vcpu(kvm, full())
        with td, v:
            theirs = quirk_free(v.tdx_get_cpuid())
            assert v.tdx_init_vcpu().errno == errno.EINVAL  # no CPUID yet: no x2APIC
            no_x2apic = tuple(e.with_reg("ecx", e.ecx & ~X2APIC) if e.function == 1 else e
                              for e in theirs)
            assert v.set_cpuid2(no_x2apic) == 0
            assert v.tdx_init_vcpu().errno == errno.EINVAL
            assert v.set_cpuid2(theirs) == 0
            assert v.tdx_init_vcpu(flags=1).errno == errno.EINVAL
            assert v.tdx_init_vcpu().ok
            assert v.tdx_init_vcpu().errno == errno.EINVAL  # once per vCPU
            assert v.tdx_get_cpuid()  # the TD is not finalised: still readable


def test_set_cpuid2_takes_what_the_td_lacks() -> None:
    """Linux 7.3 does not hold KVM_SET_CPUID2 to the TD's CPUID (the series' open item)."""
    with Kvm(sim()) as kvm:
        td, v = td_vcpu(kvm, full())
        with td, v:
            theirs = quirk_free(v.tdx_get_cpuid())
            lie = tuple(e.with_reg("ecx", e.ecx | WAITPKG) if (e.function, e.index) == (7, 0)
                        else e for e in theirs)
            assert not next(e for e in theirs if (e.function, e.index) == (7, 0)).ecx & WAITPKG
            assert v.set_cpuid2(lie) == 0
            kept = v.get_cpuid2()
    assert next(e for e in kept if (e.function, e.index) == (7, 0)).ecx & WAITPKG


def test_set_cpuid2_refusals() -> None:
    with Kvm(sim()) as kvm:
        td, v = td_vcpu(kvm, full())
        with td, v:
            theirs = v.tdx_get_cpuid()
            assert v.set_cpuid2(theirs) == errno.EPERM  # AMX tile data: no guest permission
            assert v.set_cpuid2(quirk_free(theirs), nent=257) == errno.E2BIG
            wide = (CpuidEntry(0x80000008, 0, 0, 0x2830),)  # a 40-bit linear address width
            assert v.set_cpuid2(wide) == errno.EINVAL
            assert v.get_cpuid2() == ()


def test_get_cpuid2_applies_the_runtime_bits() -> None:
    """kvm_update_cpuid_runtime at RESET: OSXSAVE and OSPKE clear, APIC as the in-kernel
    local APIC (enabled), the XSAVE sizes of x87 state alone."""
    entries = (CpuidEntry(1, 0, 0, 0, 0, 1 << 27, 0), CpuidEntry(7, 0, 1, 0, 0, 1 << 4, 0),
               CpuidEntry(0xD, 0, 1, 3, 0x2A00, 0x2A00, 0),
               CpuidEntry(0xD, 1, 1, 0xF, 0x9999, 0, 0))
    with Kvm(sim()) as kvm:
        td, v = td_vcpu(kvm, full())
        with td, v:
            assert v.set_cpuid2(entries) == 0
            got = v.get_cpuid2()
    assert got == (CpuidEntry(1, 0, 0, 0, 0, 0, 1 << 9), CpuidEntry(7, 0, 1, 0, 0, 0, 0),
                   CpuidEntry(0xD, 0, 1, 3, 576, 0x2A00, 0),
                   CpuidEntry(0xD, 1, 1, 0xF, 576, 0, 0))
    with Kvm(sim()) as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as plain:
        assert plain.set_cpuid2(entries[:1]) == 0
        assert plain.get_cpuid2() == (CpuidEntry(1),)  # no in-kernel APIC: APIC clear


def test_an_ordinary_vcpu_refuses_tdx_commands() -> None:
    with Kvm(sim()) as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as v:
        assert v.tdx_get_cpuid_raw(8).errno == errno.EINVAL
        assert v.tdx_init_vcpu().errno == errno.EINVAL
        with pytest.raises(OSError) as unknown:
            v.ioctl(uapi.Ioctl.KVM_GET_API_VERSION, 0)
        assert unknown.value.errno == errno.EINVAL


# ---------------------------------------------------------------------------
# Random accepted requests: the simulated module's TD CPUID is the mirror's.


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from(BUNDLED_MODULES), st.sampled_from(sorted(HOSTS)),
       st.sampled_from(POLICY_NAMES), st.data())
def test_every_accepted_td_reads_back_as_predicted(module: str, host: str, policy: str,
                                                   data: st.DataObject) -> None:
    req, raw = data.draw(requests(module, host, policy))
    m, h, s = combo(module, host, policy)
    pred = mirror.init_vm_prediction(m, h, get_policy(policy), req)
    if pred.outcome.kind is not Kind.ACCEPTED or req.flags or req.hw_error:
        return
    assert pred.effective is not None and pred.td_params is not None
    gpaw = 52 if pred.td_params.config_flags & 1 else 48
    want = get_cpuid(TdCpuid(m.tables, pred.effective, pred.faulting), gpaw)
    with Kvm(s) as kvm, kvm.create_td() as td:
        assert td.init_vm(raw).kind is Kind.ACCEPTED
        td.enable_split_irqchip()
        with td.create_vcpu(0) as v:
            assert v.tdx_get_cpuid() == want, f"{module}/{host}/{policy}"
    assert s.open_fds == ()

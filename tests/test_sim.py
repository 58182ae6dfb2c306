"""The simulated host behind the seam, driven through the real device layer (Kvm / TdxVm)."""

from __future__ import annotations

import ast
import errno
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kvmtdx import layout, uapi
from kvmtdx.device import Kvm, TdxVm
from kvmtdx.errors import KvmError
from kvmtdx.model import mirror
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import MAX_HOST, Host, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Kind
from kvmtdx.sim import CATALOGUE, MUTANTS, Mutant, SimulatedHost, choices, mutants
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, Capabilities, CpuidEntry, InitVm, TdxCmd

ROOT = Path(__file__).resolve().parent.parent
MODULE = load_profile("2.0")


def make(policy: str = "upstream", key_ids: int = 16, host: Host = MAX_HOST,
         mutant: str | None = None) -> SimulatedHost:
    return SimulatedHost(MODULE, host, get_policy(policy), mutant=mutant, key_ids=key_ids)


def valid(policy: str = "upstream") -> InitVm:
    return mirror.full_request(MODULE, MAX_HOST, get_policy(policy)).init_vm


@pytest.fixture
def sim(no_fd_leak: object) -> Iterator[SimulatedHost]:
    s = make()
    yield s
    assert s.open_fds == (), "the simulated host still has fds open"
    assert s.live_tds == 0


def expect_errno(code: int, call: object, *args: int | str) -> None:
    assert callable(call)
    with pytest.raises(OSError) as info:
        call(*args)
    assert info.value.errno == code


# ---------------------------------------------------------------------------
# /dev/kvm


def test_only_dev_kvm_opens(sim: SimulatedHost) -> None:
    expect_errno(errno.ENOENT, sim.open, "/dev/kvm0", uapi.O_RDWR)
    with pytest.raises(KvmError) as info:
        Kvm(sim, "/dev/nokvm")
    assert info.value.skip


def test_system_ioctls(sim: SimulatedHost) -> None:
    with Kvm(sim) as kvm:
        assert kvm.api_version() == 12
        assert kvm.vm_types() == 1 << 0 | 1 << 5
        assert kvm.has_tdx()
        assert kvm.check_extension(1) == 0  # other capabilities: not offered
        assert kvm.fd is not None
        expect_errno(errno.EINVAL, sim.ioctl, kvm.fd, uapi.Ioctl.KVM_GET_API_VERSION, 1)
        expect_errno(errno.ENOTTY, sim.ioctl, kvm.fd, uapi.Ioctl.KVM_MEMORY_ENCRYPT_OP, 0)
        expect_errno(errno.ENOTTY, sim.ioctl, kvm.fd, 0xAEFF, 0)
        for vm_type in (1, 2, 3, 4, 6, 0xFFFF):
            expect_errno(errno.EINVAL, kvm.create_vm, vm_type)
        with kvm.create_vm(0) as vm0, kvm.create_vm(5) as vm5:
            assert isinstance(vm5, TdxVm) and not isinstance(vm0, TdxVm)
            assert sim.live_tds == 1
        assert sim.live_tds == 0


def test_supported_cpuid_grows_and_e2big_leaves_the_buffer_alone(sim: SimulatedHost) -> None:
    with Kvm(sim) as kvm:
        entries = kvm.supported_cpuid(start_nent=1)  # grows through E2BIG
        # The max host is a host file like any other: its own leaves.
        assert len(entries) == len(MAX_HOST.native)
        leaf1 = next(e for e in entries if e.function == 1)
        assert leaf1.eax == MAX_HOST.fms and not leaf1.flags
        leaf7 = next(e for e in entries if (e.function, e.index) == (7, 1))
        assert leaf7.flags == FLAG_SIGNIFICANT_INDEX and leaf7.eax == MAX_HOST.cpuid(7, 1)[0]
        assert kvm.fd is not None
        for nent in (0, 1, len(entries) - 1):
            before = layout.pack_cpuid2((CpuidEntry(function=0xAB, eax=7),), nent=nent, room=4)
            mem = uapi.Memory(before)
            expect_errno(errno.E2BIG, sim.ioctl, kvm.fd, uapi.Ioctl.KVM_GET_SUPPORTED_CPUID,
                         mem.address)
            assert mem.read() == before
        expect_errno(errno.EFAULT, sim.ioctl, kvm.fd, uapi.Ioctl.KVM_GET_SUPPORTED_CPUID, 0x1000)


def test_a_partial_host_lists_its_own_leaves(no_fd_leak: object) -> None:
    host = Host(name="h", native={(1, None): (0x906EA, 0, 1, 2), (7, 0): (0, 5, 6, 7)},
                kvm_xfam=0x2E7)
    with Kvm(make(host=host)) as kvm:
        got = kvm.supported_cpuid()
    assert got == (CpuidEntry(function=1, eax=0x906EA, ecx=1, edx=2),
                   CpuidEntry(function=7, flags=FLAG_SIGNIFICANT_INDEX, ebx=5, ecx=6, edx=7))


def test_fds_look_real_and_are_never_reused_while_open(sim: SimulatedHost) -> None:
    kvm = Kvm(sim)
    vms = [kvm.create_vm(5) for _ in range(5)]
    fds = [kvm.fd, *(vm.fd for vm in vms)]
    assert all(isinstance(fd, int) and fd >= 3 for fd in fds)
    assert len(set(fds)) == len(fds)
    assert sim.open_fds == tuple(sorted(fd for fd in fds if fd is not None))
    closed = vms[2].fd
    assert closed is not None
    vms[2].close()
    expect_errno(errno.EBADF, sim.close, closed)
    expect_errno(errno.EBADF, sim.ioctl, closed, uapi.Ioctl.KVM_CHECK_EXTENSION, 0)
    expect_errno(errno.EBADF, sim.close, 12345)
    again = kvm.create_vm(5)
    assert again.fd not in [vm.fd for vm in vms if vm.fd is not None] + [kvm.fd]
    for vm in [*vms, again]:
        vm.close()
    kvm.close()


# ---------------------------------------------------------------------------
# VM fds and KVM_MEMORY_ENCRYPT_OP


def test_memory_encrypt_op_needs_a_td(sim: SimulatedHost) -> None:
    with Kvm(sim) as kvm, kvm.create_vm(0) as vm:
        assert vm.fd is not None
        cmd = uapi.Memory(layout.pack_cmd(TdxCmd(id=0)))
        expect_errno(errno.ENOTTY, sim.ioctl, vm.fd, uapi.Ioctl.KVM_MEMORY_ENCRYPT_OP, cmd.address)
        expect_errno(errno.ENOTTY, sim.ioctl, vm.fd, uapi.Ioctl.KVM_GET_API_VERSION, 0)
        assert vm.ioctl(uapi.Ioctl.KVM_CHECK_EXTENSION, uapi.KVM_CAP_VM_TYPES) == 0b100001


@pytest.mark.parametrize("policy", ["upstream-6.16", "upstream", "rfc-v2"])
def test_capabilities_grow_and_match_the_module(policy: str, no_fd_leak: object) -> None:
    s = make(policy)
    with Kvm(s) as kvm, kvm.create_td() as td:
        caps = td.capabilities(start_nent=1)
    assert caps.nent == len(MODULE.rows) == len(caps.entries)
    assert caps.supported_attrs == 1 << 28
    assert caps.user_tdvmcallinfo_1_r11 == (3 if policy == "upstream-6.16" else 2)
    assert [(e.function, e.index) for e in caps.entries] == [
        (r.leaf, r.kvm_index) for r in MODULE.rows]
    gpaw = next(e for e in caps.entries if e.function == 0x80000008)
    assert gpaw.eax >> 16 & 0xFF == 0xFF
    leaf7 = next(e for e in caps.entries if (e.function, e.index) == (7, 0))
    assert leaf7.ebx & (1 << 4 | 1 << 11) == 0 and leaf7.ecx & 1 << 5 == 0
    if policy == "rfc-v2":
        assert leaf7.edx & 1 << 18 == 0  # PCONFIG: listed by the module, not allowed
        assert leaf7.edx & 1 << 30  # CORE_CAPABILITIES, patch 4/4
    else:
        assert leaf7.edx & 1 << 18


@pytest.mark.parametrize("policy", ["upstream", "upstream-6.16"])
def test_capabilities_errors_leave_the_buffer_alone(policy: str, no_fd_leak: object) -> None:
    s = make(policy)
    def garbage(nent: int) -> bytes:
        return layout.pack_capabilities(Capabilities(
            supported_attrs=0x5A5A, reserved=(9,) * 250, nent=nent, cpuid_padding=3),
            nent_room=nent)

    with Kvm(s) as kvm, kvm.create_td() as td:
        small = td.capabilities_raw(27, fill=garbage(27))
        flagged = td.capabilities_raw(28, flags=1)
        hw = td.capabilities_raw(28, hw_error=5)
        ok = td.capabilities_raw(28, fill=garbage(28))
    assert small.errno == errno.E2BIG and small.data == garbage(27)
    assert ok.errno == 0
    assert flagged.errno == errno.EINVAL and hw.errno == errno.EINVAL
    assert hw.cmd.hw_error == 5
    got = layout.unpack_capabilities(ok.data)
    # 6.16 echoes the caller's header words it does not set; later kernels zero them.
    assert got.reserved == ((9,) * 250 if policy == "upstream-6.16" else (0,) * 250)
    assert got.cpuid_padding == (3 if policy == "upstream-6.16" else 0)


def test_no_tdx_xfam_means_eio(no_fd_leak: object) -> None:
    s = make(host=replace(MAX_HOST, name="no-x87", kvm_xfam=0x2E6))
    with Kvm(s) as kvm, kvm.create_td() as td:
        assert td.capabilities_raw(28).errno == errno.EIO


def test_low_addresses_fault(sim: SimulatedHost) -> None:
    with Kvm(sim) as kvm, kvm.create_td() as td:
        for address in (0, 0x1000, 0xFFFF):
            res = td.memory_encrypt_op(TdxCmd(id=1), None, cmd_address=address)
            assert res.errno == errno.EFAULT
        for sub in (uapi.TdxCommand.KVM_TDX_CAPABILITIES, uapi.TdxCommand.KVM_TDX_INIT_VM):
            res = td.memory_encrypt_op(TdxCmd(id=sub, data=0x100), None)
            assert res.errno == errno.EFAULT
            assert res.cmd == TdxCmd(id=sub, data=0x100)  # INIT_VM wrote it back unchanged
        assert td.init_vm(valid()).kind is Kind.ACCEPTED  # nothing was consumed


def test_init_vm_once_per_td_and_the_check_order(sim: SimulatedHost) -> None:
    good = valid()
    with Kvm(sim) as kvm:
        with kvm.create_td() as td:
            assert td.init_vm(good).kind is Kind.ACCEPTED
            again = td.init_vm_raw(good)
            assert (again.errno, again.cmd.hw_error) == (errno.EINVAL, 0)
        with kvm.create_td() as td:
            hw = td.init_vm_raw(good, hw_error=7)
            assert hw.errno == errno.EINVAL and hw.cmd.hw_error == 7  # never written back
            assert td.init_vm(good, flags=1).kind is Kind.KVM_REJECTED
            lying = InitVm(attributes=good.attributes, xfam=good.xfam, nent=257,
                           entries=good.entries)
            assert td.init_vm(lying).errno == errno.E2BIG
            assert td.init_vm(InitVm(reserved=(0,) * 11 + (1,), entries=good.entries)
                              ).errno == errno.EINVAL
            bad_fms = tuple(e if e.function != 1 else CpuidEntry(function=1, eax=0x12345)
                            for e in good.entries)
            rejected = td.init_vm_raw(InitVm(attributes=good.attributes, xfam=good.xfam,
                                             entries=bad_fms))
            assert rejected.errno == errno.EINVAL
            assert rejected.cmd.hw_error == 0xC000010000000045  # CPUID_CONFIG
            assert td.init_vm(good).kind is Kind.ACCEPTED  # the failures left it usable


@pytest.mark.parametrize("sub", [2, 3, 5, 99])
def test_other_sub_commands_are_einval_without_write_back(sub: int, sim: SimulatedHost) -> None:
    with Kvm(sim) as kvm, kvm.create_td() as td:
        res = td.memory_encrypt_op(TdxCmd(id=sub), b"\0" * 64)
        assert res.errno == errno.EINVAL


def test_finalize_before_init_vm_is_einval(sim: SimulatedHost) -> None:
    with Kvm(sim) as kvm, kvm.create_td() as td:
        assert td.memory_encrypt_op(TdxCmd(id=uapi.TdxCommand.KVM_TDX_FINALIZE_VM), None).errno == (
            errno.EINVAL)


# ---------------------------------------------------------------------------
# TDX key IDs


def test_key_ids_run_out_and_come_back(no_fd_leak: object) -> None:
    s = make(key_ids=2)
    good = valid()
    with Kvm(s) as kvm:
        a, b, c = kvm.create_td(), kvm.create_td(), kvm.create_td()
        assert s.live_tds == 3 and s.free_key_ids == 2  # a TD takes its key at INIT_VM
        assert a.init_vm(good).kind is Kind.ACCEPTED
        assert b.init_vm(good).kind is Kind.ACCEPTED
        assert s.free_key_ids == 0
        out = c.init_vm_raw(good)
        assert (out.errno, out.cmd.hw_error) == (errno.ENOSPC, 0)
        a.close()
        assert s.free_key_ids == 1
        assert c.init_vm(good).kind is Kind.ACCEPTED
        b.close()
        c.close()
    assert s.free_key_ids == 2 and s.live_tds == 0 and s.open_fds == ()


def test_a_failed_module_call_returns_its_key_id_unless_a_mutant_leaks_it(
        no_fd_leak: object) -> None:
    good = valid()
    bad = InitVm(attributes=good.attributes, xfam=good.xfam, entries=tuple(
        e if e.function != 1 else CpuidEntry(function=1, eax=0x12345) for e in good.entries))
    for mutant, left in ((None, 1), ("key_id_leak_on_failure", 0)):
        s = make(key_ids=1, mutant=mutant)
        with Kvm(s) as kvm:
            with kvm.create_td() as td:
                assert td.init_vm(bad).kind is Kind.MODULE_REJECTED
            assert s.free_key_ids == left
            with kvm.create_td() as td:
                want = Kind.ACCEPTED if left else Kind.ERROR
                assert td.init_vm(good).kind is want


# ---------------------------------------------------------------------------
# Independence from the mirror, and the catalogue


SIM_PACKAGE = ROOT / "kvmtdx" / "sim"
# The sim's independent reading must not borrow the mirror's: neither the
# mirror itself nor the rules and request builders it is made of, nor the model's
# reading of the TDX module (the sim has its own: tdx_module, tdx_platform, tdx_cpuid;
# both read only the module's converted tables, kvmtdx.model.tdx_module_tables).
FORBIDDEN = ("kvmtdx.model.mirror", "kvmtdx.model.rules", "kvmtdx.model.builders",
             "kvmtdx.model.tdx_module", "kvmtdx.model.tdx_cpuid", "kvmtdx.model.tdx_topology",
             "kvmtdx.model.tdx_host", "kvmtdx.model.tdx_status")
FORBIDDEN_NAMES = {"__import__", "import_module", "mirror", "rules", "builders",
                   "predict_init_vm", "predict_capabilities"}


def borrowed(source: str, package: str = "kvmtdx.sim") -> list[str]:
    """What a sim module imports or names of the mirror's side."""
    tree = ast.parse(source)
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] if node.level else [])
            base = ".".join(p for p in (base, node.module or "") if p)
            imported.add(base)
            imported.update(f"{base}.{a.name}" for a in node.names)
    bad = [m for m in imported if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    # Nor reaches it some other way.
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    return sorted(bad) + sorted(names & FORBIDDEN_NAMES)


def test_the_independence_check_sees_a_borrowed_rule() -> None:
    assert borrowed("from kvmtdx.model import rules") == ["kvmtdx.model.rules"]
    assert borrowed("from ..model.mirror import predict_init_vm") == [
        "kvmtdx.model.mirror", "kvmtdx.model.mirror.predict_init_vm"]
    assert borrowed("import kvmtdx.model.builders as b") == ["kvmtdx.model.builders"]
    assert borrowed("x = importlib.import_module(name)") == ["import_module"]
    assert borrowed("mask = rules.GPAW_FIELD") == ["rules"]
    assert borrowed("from kvmtdx.model.policy import Policy") == []
    assert borrowed("from kvmtdx.model.tdx_module import mng_init") == [
        "kvmtdx.model.tdx_module", "kvmtdx.model.tdx_module.mng_init"]
    assert borrowed("from kvmtdx.model.tdx_module_tables import ModuleTables") == []


@pytest.mark.parametrize("path", sorted(SIM_PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_sim_source_never_imports_the_mirror(path: Path) -> None:
    assert borrowed(path.read_text()) == []


def test_the_independence_check_reads_the_whole_package() -> None:
    assert {p.name for p in SIM_PACKAGE.glob("*.py")} >= {
        "__init__.py", "host.py", "kvm.py", "tdx.py", "td_init.py", "tdx_module.py",
        "tdx_platform.py", "tdx_cpuid.py", "mutants.py"}
    assert not (ROOT / "kvmtdx" / "sim.py").exists()


def test_importing_the_sim_does_not_load_the_mirror() -> None:
    code = ("import sys, kvmtdx.sim, kvmtdx.session; "
            "print(sorted(m for m in sys.modules if 'mirror' in m or 'builders' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_mutants_are_named_and_described() -> None:
    assert len(MUTANTS) >= 14
    for name, description in MUTANTS.items():
        assert name.isidentifier() and name == name.lower()
        assert description.startswith("[") and "\n" not in description
    with pytest.raises(ValueError):
        make(mutant="no_such_bug")


def test_a_mutant_names_its_policies_as_data() -> None:
    assert [m.name for m in CATALOGUE] == list(MUTANTS)
    for m in CATALOGUE:
        assert m.policies and set(m.policies) <= set(POLICY_NAMES), m.name
        tag = "all" if set(m.policies) == set(POLICY_NAMES) else ", ".join(m.policies)
        assert MUTANTS[m.name] == f"[{tag}] {m.summary}"
    policies = {m.name: m.policies for m in CATALOGUE}
    assert policies["caps_allowlist_unapplied"] == ("rfc-v2",)
    assert policies["denylist_hle_not_rtm"] == ("upstream", "upstream-6.16")
    assert policies["caps_header_not_echoed"] == ("upstream-6.16",)
    assert set(policies["flags_unchecked"]) == set(POLICY_NAMES)


def test_every_mutant_the_kernel_asks_for_is_in_the_catalogue() -> None:
    # The kernel code asks for a bug by identity with a module constant, so
    # each constant must be the catalogue's entry of the same name.
    constants = {k: v for k, v in vars(mutants).items() if isinstance(v, Mutant)}
    assert sorted(constants) == sorted(m.name.upper() for m in CATALOGUE)
    assert all(constants[m.name.upper()] is m for m in CATALOGUE)


def test_choices_lists_modules_policies_and_mutants() -> None:
    c = choices()
    assert c["modules"] == ["1.5.01", "1.5-late", "2.0"]
    assert c["policies"] == ["upstream-6.16", "upstream", "rfc-v2"]
    assert [m["name"] for m in c["mutants"]] == list(MUTANTS)


def test_full_request_bytes_round_trip_through_the_sim(sim: SimulatedHost) -> None:
    """A request sent as bytes and as a dataclass is the same request."""
    good = valid()
    with Kvm(sim) as kvm, kvm.create_td() as a, kvm.create_td() as b:
        assert a.init_vm(good).same_answer(b.init_vm(layout.pack_init_vm(good)))
    assert Request(init_vm=good).flags == 0

"""The device layer and `kvmtdx info` / `caps` on this machine's real /dev/kvm.

Every test checks, through the no_fd_leak fixture, that no file descriptor
survives it.  Tests that need TDX hardware are marked `tdx` and skip here.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import FdSnapshot

from kvmtdx import layout, uapi
from kvmtdx.device import Kvm, RealSeam, TdxVm, tdx_status
from kvmtdx.structs import KVM_MAX_CPUID_ENTRIES, TdxCmd

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.realkvm, pytest.mark.usefixtures("real_kvm", "no_fd_leak")]


class RecordingSeam(RealSeam):
    """The real kernel, recording each KVM_GET_SUPPORTED_CPUID's nent and errno."""

    def __init__(self) -> None:
        self.cpuid_calls: list[tuple[int, int]] = []

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        if request != uapi.Ioctl.KVM_GET_SUPPORTED_CPUID:
            return super().ioctl(fd, request, arg)
        nent = int.from_bytes(uapi.peek(arg, 4), "little")
        try:
            ret = super().ioctl(fd, request, arg)
        except OSError as e:
            self.cpuid_calls.append((nent, e.errno or 0))
            raise
        self.cpuid_calls.append((nent, 0))
        return ret


def _has_tdx() -> bool:
    with Kvm() as kvm:
        return kvm.has_tdx()


def test_api_version_is_12() -> None:
    with Kvm() as kvm:
        assert kvm.api_version() == uapi.KVM_API_VERSION == 12


def test_vm_types_bitmask() -> None:
    with Kvm() as kvm:
        raw = kvm.check_extension(uapi.KVM_CAP_VM_TYPES)
        mask = kvm.vm_types()
    assert mask & 1 << uapi.VmType.KVM_X86_DEFAULT_VM
    assert mask == (raw if raw > 0 else 1)
    assert mask < 1 << 32


def test_create_tdx_vm_refused_and_reported_as_no_tdx() -> None:
    if _has_tdx():
        pytest.skip("this host offers KVM_X86_TDX_VM")
    with Kvm() as kvm, pytest.raises(OSError) as e:
        kvm.create_vm(uapi.VmType.KVM_X86_TDX_VM).close()
    assert e.value.errno == errno.EINVAL
    status = tdx_status()
    assert not status.available and status.skip
    assert status.kvm_api_version == 12
    assert "KVM_X86_TDX_VM" in status.reason


def test_supported_cpuid_real() -> None:
    with Kvm() as kvm:
        entries = kvm.supported_cpuid()
    functions = {e.function for e in entries}
    assert {0, 1, 0x80000000} <= functions
    leaf0 = next(e for e in entries if e.function == 0)
    assert leaf0.eax >= 7  # highest basic leaf: every x86-64 KVM host reports leaf 7
    assert len(entries) == len({(e.function, e.index) for e in entries})


def test_supported_cpuid_grows_from_one_entry() -> None:
    seam = RecordingSeam()
    with Kvm(seam) as kvm:
        grown = kvm.supported_cpuid(start_nent=1)
        roomy = kvm.supported_cpuid(start_nent=KVM_MAX_CPUID_ENTRIES)
    assert grown == roomy
    first, *_, last = seam.cpuid_calls[:-1]
    assert first == (1, errno.E2BIG)
    assert last[0] >= len(grown) and last[1] == 0
    errnos = [e for _, e in seam.cpuid_calls[:-2]]
    assert all(e == errno.E2BIG for e in errnos)  # every call before the last grew


def test_memory_encrypt_op_on_ordinary_vm_fails_cleanly() -> None:
    with Kvm() as kvm:
        with kvm.create_vm(uapi.VmType.KVM_X86_DEFAULT_VM) as vm:
            assert not isinstance(vm, TdxVm)
            data = layout.pack_capabilities(layout.unpack_capabilities(bytes(layout.caps_size(1))))
            cmd = TdxCmd(id=uapi.TdxCommand.KVM_TDX_CAPABILITIES, hw_error=0)
            res = vm.memory_encrypt_op(cmd, data)
        assert kvm.counters.vms_created == 1
    assert res.errno == errno.ENOTTY
    assert res.data == data  # KVM never touched the buffer
    assert res.cmd.hw_error == 0 and res.cmd.id == uapi.TdxCommand.KVM_TDX_CAPABILITIES


def test_closed_handles_refuse_and_close_twice_is_harmless() -> None:
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.close()
    vm.close()
    kvm.close()
    kvm.close()
    with pytest.raises(ValueError):
        kvm.api_version()
    assert kvm.counters.opens == kvm.counters.closes == 2


def test_an_exception_inside_the_handles_closes_every_fd(no_fd_leak: FdSnapshot) -> None:
    with pytest.raises(RuntimeError), Kvm() as kvm, kvm.create_vm():
        raise RuntimeError("boom")


def _kvmtdx(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmtdx", *args], capture_output=True,
                          text=True, check=False, cwd=ROOT)


def test_info_on_this_host_exits_4_with_json() -> None:
    if _has_tdx():
        pytest.skip("this host offers KVM_X86_TDX_VM")
    res = _kvmtdx("info", "--format", "json")
    assert res.returncode == 4, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kvm_api_version"] == 12
    assert 0 in doc["vm_types"] and 5 not in doc["vm_types"]
    assert doc["tdx_available"] is False
    assert "KVM_X86_TDX_VM" in doc["reason"]
    assert doc["kernel_release"] == os.uname().release
    assert isinstance(doc["cpu_model"], str) and doc["cpu_model"]
    assert doc["native_cpuid"]["path"] == "/dev/cpu/0/cpuid"
    assert "KVM_X86_TDX_VM" in res.stderr and "--simulate" in res.stderr
    assert res.stderr.count("\n") == 1


def test_caps_on_this_host_exits_4_naming_simulate() -> None:
    if _has_tdx():
        pytest.skip("this host offers KVM_X86_TDX_VM")
    res = _kvmtdx("caps")
    assert res.returncode == 4
    assert res.stdout == ""
    assert "KVM_X86_TDX_VM" in res.stderr and "--simulate" in res.stderr
    assert res.stderr.count("\n") == 1


# ---------------------------------------------------------------------------
# The permission path, for real: an unprivileged user against root-only /dev/kvm.

DROP_THEN_RUN = """
import os, sys
import kvmtdx.cli, kvmtdx.hostinfo, kvmtdx.native, kvmtdx.model.policy, kvmtdx.session
import kvmtdx.report.info, kvmtdx.checks, kvmtdx.report.verify
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([]); os.setgid(gid); os.setuid(uid)
assert os.geteuid() == uid
sys.exit(kvmtdx.cli.main(sys.argv[3:]))
"""


@pytest.fixture
def world_readable_copy() -> Iterator[Path]:
    """The package (with its cdefs) in a directory any user can read."""
    d = Path(tempfile.mkdtemp(prefix="kvmtdx-nobody-"))
    try:
        d.chmod(0o755)
        for tree in ("kvmtdx", "cdefs"):
            shutil.copytree(ROOT / tree, d / tree,
                            ignore=shutil.ignore_patterns("__pycache__"))
        for p in d.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_user(uid: int, gid: int) -> Callable[[], None]:
    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return drop


@pytest.mark.parametrize("command", ["info", "verify"])
def test_as_unprivileged_user_skips_and_names_the_fix(world_readable_copy: Path,
                                                      command: str) -> None:
    """kselftest's convention: no permission on /dev/kvm is a skip (4) saying how to get it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is world-accessible here: no permission path to test")
    nobody = pwd.getpwnam("nobody")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(world_readable_copy)
    argv = [command, "--format", "json"]
    drop = _as_user(nobody.pw_uid, nobody.pw_gid)
    try:
        # The whole process as nobody, when nobody can run this interpreter.
        res = subprocess.run([sys.executable, "-m", "kvmtdx", *argv], capture_output=True,
                             text=True, check=False, cwd="/", env=env, preexec_fn=drop)
        usable = "No module named" not in res.stderr
    except PermissionError:
        usable = False
    if not usable:
        # The interpreter or its site-packages sit where nobody cannot reach (e.g. under
        # /root): import as root, then drop to nobody before anything touches /dev/kvm.
        res = subprocess.run(
            [sys.executable, "-c", DROP_THEN_RUN, str(nobody.pw_uid), str(nobody.pw_gid),
             *argv],
            capture_output=True, text=True, check=False, cwd="/", env=env)
    assert res.returncode == 4, res.stderr
    doc = json.loads(res.stdout)
    reason = doc["reason"] if command == "info" else doc["skip"]["reason"]
    if command == "info":
        assert doc["tdx_available"] is False and doc["kvm_api_version"] is None
    else:
        assert doc["verdict"] == "skip" and doc["checks"] == []
    assert "permission denied" in reason and "usermod -aG kvm" in reason
    assert "permission denied" in res.stderr and res.stderr.count("\n") == 1


# ---------------------------------------------------------------------------
# Only on a TDX host.


@pytest.mark.tdx
@pytest.mark.usefixtures("real_tdx")
def test_tdx_host_info_exits_0() -> None:
    res = _kvmtdx("info", "--format", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["tdx_available"] is True and 5 in doc["vm_types"]


@pytest.mark.tdx
@pytest.mark.usefixtures("real_tdx")
def test_tdx_host_caps_returns_rows() -> None:
    with Kvm() as kvm:
        td = kvm.create_td()
        with td:
            caps = td.capabilities(start_nent=1)
            too_small = td.capabilities_raw(max(len(caps.entries) - 1, 0))
    assert caps.nent == len(caps.entries) >= 12
    assert caps.supported_attrs and caps.supported_xfam
    assert too_small.errno == errno.E2BIG
    res = _kvmtdx("caps", "--format", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert len(doc["cpuid"]) == caps.nent
    assert {"function", "index", "flags", "eax", "ebx", "ecx", "edx"} <= set(doc["cpuid"][0])

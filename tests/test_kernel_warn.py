"""init_vm_no_kernel_warn: requests the TDX module fails with a status other than an invalid
operand, and whether the kernel WARNs on them (spec section 4, step 10).

On the simulated and kernel-source hosts the backend counts its WARNs; on a real kernel the
check reads /dev/kmsg and must be asked to provoke a WARN (--allow-kernel-warn), never with
kernel.panic_on_warn set.  Here the real kernel is a wrapper that hides the simulated host's
count and writes the kernel's line into a file laid out like /dev/kmsg.
"""

from __future__ import annotations

import difflib
import errno
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import PassThrough, run_cli, simulated
from kernelsrc_support import backend, linux_tree

from kvmtdx import checks, uapi
from kvmtdx.checks.result import CheckResult
from kvmtdx.kernelsrc.extract import TDX_C
from kvmtdx.kmsg import KernelLog, LogUnreadable
from kvmtdx.knowledge import Given
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.sim import SimulatedHost

CHECK = "init_vm_no_kernel_warn"
LINE = "kvm_intel: SEAMCALL TDH_MNG_INIT failed: 0xc000090400000000, rcx 0x0"


def kmsg(path: Path, *messages: str, first_seq: int = 100) -> None:
    lines = [f"4,{first_seq + i},{1000 + i},-;{m}\n SUBSYSTEM=kvm\n"
             for i, m in enumerate(messages)]
    path.write_text("".join(lines))


def logs(tmp_path: Path, panic: str | None = "0", tainted: str = "0") -> KernelLog:
    log = KernelLog(kmsg=str(tmp_path / "kmsg"), panic_on_warn_path=str(tmp_path / "panic"),
                    tainted_path=str(tmp_path / "tainted"))
    kmsg(Path(log.kmsg), "Linux version 7.3.4", "kvm_intel: TDX enabled")
    if panic is not None:
        Path(log.panic_on_warn_path).write_text(panic + "\n")
    Path(log.tainted_path).write_text(tainted + "\n")
    return log


class RealLike(PassThrough):
    """A simulated host as a real kernel looks: no WARN count; the WARN goes to the log."""

    def __init__(self, inner: SimulatedHost, log: KernelLog) -> None:
        super().__init__(inner)
        self.log = log

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        before = self.inner.kernel_warnings
        try:
            return super().ioctl(fd, request, arg)
        finally:
            if self.inner.kernel_warnings > before:
                seq = len(Path(self.log.kmsg).read_text().splitlines()) + 200
                with open(self.log.kmsg, "a") as f:
                    f.write(f"4,{seq},9999,-;WARNING: CPU: 3 PID: 77 at "
                            f"arch/x86/kvm/vmx/tdx.c:2617 __tdx_td_init\n4,{seq + 1},9999,-;"
                            f"{LINE}\n")
                Path(self.log.tainted_path).write_text("512\n")


def run(seam: Any, log: KernelLog | None, *, allow: bool, module: str = "2.0",
        policy: str = "upstream") -> CheckResult:
    m = load_profile(module)
    given = Given(module=m, module_source="test", host=MAX_HOST, host_source="test",
                  policy=policy)
    report = checks.run_verify(seam, backend_label="test", given=given, only=[CHECK],
                               allow_kernel_warn=allow, kernel_log=log)
    [result] = report.checks
    return result


# ---------------------------------------------------------------------------
# The kernel log reader.


def test_the_log_reads_records_and_skips_continuation_lines(tmp_path: Path) -> None:
    log = logs(tmp_path)
    assert [(r.seq, r.message) for r in log.records()] == [
        (100, "Linux version 7.3.4"), (101, "kvm_intel: TDX enabled")]
    mark = log.mark()
    assert mark == 101 and log.since(mark) == []
    with open(log.kmsg, "a") as f:
        f.write(f"3,102,2000,-;{LINE}\n")
    assert [r.message for r in log.since(mark)] == [LINE]
    assert log.panic_on_warn() is False and log.tainted() == 0


def test_an_unreadable_log_names_the_file(tmp_path: Path) -> None:
    log = KernelLog(kmsg=str(tmp_path / "absent"))
    with pytest.raises(LogUnreadable, match="absent"):
        log.mark()
    assert KernelLog(panic_on_warn_path=str(tmp_path / "none")).panic_on_warn() is None


# ---------------------------------------------------------------------------
# When the check runs on a real kernel.


def test_a_real_kernel_is_not_made_to_warn_unless_asked(tmp_path: Path) -> None:
    log = logs(tmp_path)
    r = run(RealLike(simulated(), log), log, allow=False)
    assert r.status == "skip" and "--allow-kernel-warn" in r.detail
    assert "taints" in r.detail and "panic_on_warn" in r.detail
    assert [m.message for m in log.records()][-1] == "kvm_intel: TDX enabled"  # nothing sent


@pytest.mark.parametrize(("panic", "why"), [("1", "kernel.panic_on_warn is 1"),
                                            (None, "cannot read kernel.panic_on_warn")])
def test_never_with_panic_on_warn_set_or_unknown(tmp_path: Path, panic: str | None,
                                                 why: str) -> None:
    log = logs(tmp_path, panic=panic)
    r = run(RealLike(simulated(), log), log, allow=True)
    assert r.status == "skip" and why in r.detail


def test_a_real_kernel_asked_to_warn_is_judged_by_its_log_and_left_tainted(
        tmp_path: Path) -> None:
    log = logs(tmp_path)
    r = run(RealLike(simulated(), log), log, allow=True)
    assert r.status == "fail", r.detail
    assert "malformed leaf 0x1F" in r.detail and LINE in r.detail
    assert "VM marked bugged" in r.detail
    assert "the kernel is now tainted (taint flags 0x200, W set)" in r.detail


def test_an_unreadable_log_is_said_and_the_answer_still_judged(tmp_path: Path) -> None:
    log = logs(tmp_path)
    unreadable = KernelLog(kmsg=str(tmp_path / "no-kmsg"),
                           panic_on_warn_path=log.panic_on_warn_path,
                           tainted_path=log.tainted_path)
    r = run(RealLike(simulated(), log), unreadable, allow=True)
    assert r.status == "fail"
    assert "the kernel log is unreadable" in r.detail and "no-kmsg" in r.detail


# ---------------------------------------------------------------------------
# Simulated and kernel-source hosts count their WARNs: the check always runs there.


def test_the_simulated_7_3_kernel_warns_on_a_malformed_leaf_1f() -> None:
    s = simulated()
    r = run(s, None, allow=False)
    assert r.status == "fail" and "counted by the backend" in r.detail
    assert r.actual == "ERROR -EIO, kernel WARN" and s.kernel_warnings == 1


MAPPING = "\tif ((err & TDX_SEAMCALL_STATUS_MASK) == TDX_OPERAND_INVALID) {\n"


def test_a_kernel_that_hands_every_status_to_userspace_passes(tmp_path: Path) -> None:
    """Linux 7.3 with __tdx_td_init taking every module status as the caller's (-EINVAL, the
    status in hw_error): no WARN, so the check passes, on the tree's own code."""
    tree = linux_tree()
    before = (tree / TDX_C).read_text()
    assert before.count(MAPPING) == 1
    after = before.replace(MAPPING, "\tif (err) {\n")
    patch = tmp_path / "no-warn.patch"
    patch.write_text("".join(difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True),
        f"a/{TDX_C}", f"b/{TDX_C}")))
    b = backend(tree, [str(patch)])
    r = run(b.seam, None, allow=False)
    assert r.status == "pass", r.detail
    assert "refused without a kernel WARN" in r.detail and b.seam.kernel_warnings == 0
    assert "MODULE_REJECTED -EINVAL hw_error 0xc000090400000000" in r.detail


def test_a_module_without_topology_rows_has_nothing_to_provoke() -> None:
    r = run(simulated("1.5.01"), None, allow=False, module="1.5.01")
    assert r.status == "skip" and "no leaf 0x1F rows" in r.detail


def test_tsx_without_tsx_ctrl_is_provoked_where_the_bypass_reaches_the_module(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from kvmtdx.model.host_files import host_to_json

    host = replace(MAX_HOST, name="no-tsx-ctrl", tsx_ctrl=False)
    path = tmp_path / "host.json"
    path.write_text(json.dumps(host_to_json(host)))
    r = run_cli(capsys, "verify", "--simulate", "2.0:upstream", "--host", str(path),
                "--format", "json")
    check = next(c for c in r.json()["checks"] if c["id"] == CHECK)
    assert check["status"] == "fail"
    assert "malformed leaf 0x1F" in check["detail"]
    assert "HLE+RTM steered past KVM's denylist, on a host without TSX_CTRL: ERROR -EIO" \
        in check["detail"]


def test_is_dead_tells_a_bugged_vm(tmp_path: Path) -> None:
    from kvmtdx.device import Kvm
    from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, CpuidEntry, InitVm

    s = simulated()
    req = InitVm(xfam=3, entries=(CpuidEntry(0x1F, 0, FLAG_SIGNIFICANT_INDEX),
                                  CpuidEntry(0x1F, 1, FLAG_SIGNIFICANT_INDEX, ecx=0x201),
                                  CpuidEntry(0x80000008, eax=48 << 16)))
    with Kvm(s) as kvm, kvm.create_td() as td, kvm.create_td() as other:
        assert not td.is_dead()
        assert td.init_vm(req).errno == errno.EIO
        assert td.is_dead() and not other.is_dead()
        with pytest.raises(OSError) as e:
            td.ioctl(uapi.Ioctl.KVM_CHECK_EXTENSION, uapi.KVM_CAP_VM_TYPES)
        assert e.value.errno == errno.EIO

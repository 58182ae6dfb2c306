"""The log recognisers, on lines shaped like the real messages (written here, not copied):
QEMU, libvirt, the kernel log, cloud-hypervisor, other hypervisors, and bare values."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from kvmtdx.errors import DataError
from kvmtdx.explain.logs import Finding, Kind, classify_token, read_input, scan


def one(line: str) -> list[Finding]:
    return scan(line, "t")


def test_kernel_tdx_bug_on_line_gives_status_seamcall_and_rcx() -> None:
    [f] = one("[ 8812.553412] kvm_intel: SEAMCALL TDH_MNG_INIT failed: 0xc00009210000010a, "
              "rcx 0x700000000")
    assert (f.kind, f.source, f.value) == (Kind.STATUS, "kernel", 0xC00009210000010A)
    assert f.seamcall == "TDH_MNG_INIT" and f.rcx == 0x700000000
    assert f.line_no == 1 and f.origin == "t"


def test_kernel_line_with_two_arguments_and_journal_prefix() -> None:
    [f] = one("Nov 30 10:12:01 td7 kernel: kvm_intel: SEAMCALL TDH_MEM_PAGE_ADD failed: "
              "0x8000020000000092, entry 0x0, level_state 0x0")
    assert f.value == 0x8000020000000092 and f.rcx is None and f.seamcall == "TDH_MEM_PAGE_ADD"


def test_kernel_seamcall_err_line_names_the_seamcall_by_leaf() -> None:
    [f] = one("virt/tdx: SEAMCALL (0x0000000000000015) failed: 0xc000010000000045")
    assert f.seamcall == "TDH.MNG.INIT" and f.value == 0xC000010000000045


def test_kernel_warn_splat_and_package_warning() -> None:
    [w] = one("WARNING: CPU: 3 PID: 991 at arch/x86/kvm/vmx/tdx.c:2617 "
              "__tdx_td_init+0x5c1/0x7a0 [kvm_intel]")
    assert (w.kind, w.value, w.name) == (Kind.WARN, 2617, "__tdx_td_init")
    [p] = one("kvm_intel: All packages need to have online CPU to create TD. Online CPU and retry.")
    assert (p.kind, p.value) == (Kind.ERRNO, errno.EIO)


def test_qemu_ioctl_failure_gives_errno_and_module_status() -> None:
    found = one("qemu-system-x86_64: TDX ioctl KVM_TDX_INIT_VM failed, hw_errors: "
                "0xc000010000000045: Invalid argument")
    assert [(f.kind, f.value) for f in found] == [(Kind.ERRNO, errno.EINVAL),
                                                  (Kind.STATUS, 0xC000010000000045)]
    assert all(f.source == "qemu" and f.ioctl == "KVM_TDX_INIT_VM" for f in found)
    assert found[0].hw_error == 0xC000010000000045


def test_qemu_eio_with_hw_error_zero_gives_only_the_errno() -> None:
    [f] = one("qemu-system-x86_64: TDX ioctl KVM_TDX_INIT_VM failed, hw_errors: 0x0: "
              "Input/output error")
    assert (f.kind, f.value, f.hw_error) == (Kind.ERRNO, errno.EIO, 0)


def test_older_qemu_shape() -> None:
    [f] = one("qemu-kvm: KVM_TDX_INIT_VM failed: Invalid argument")
    assert (f.kind, f.value, f.source) == (Kind.ERRNO, errno.EINVAL, "qemu")
    assert f.hw_error is None


@pytest.mark.parametrize("line", [
    "qemu-kvm: KVM_TDX_INIT_VM failed: -22, hw_error=0xc000010000000045",
    "qemu-kvm: KVM_TDX_INIT_VM failed: Invalid argument, hw_error=0xc000010000000045",
])
def test_older_qemu_shape_with_hw_error_gives_errno_and_status(line: str) -> None:
    e, s = one(line)
    assert (e.kind, e.value, e.hw_error) == (Kind.ERRNO, errno.EINVAL, 0xC000010000000045)
    assert (s.kind, s.value, s.ioctl) == (Kind.STATUS, 0xC000010000000045, "KVM_TDX_INIT_VM")


def test_qemu_feature_warning() -> None:
    [f] = one("qemu-system-x86_64: warning: TDX doesn't support requested feature: "
              "CPUID.07H:EDX.avx512-fp16 [bit 23]")
    assert (f.kind, f.leaf, f.register, f.value, f.name) == (Kind.FEATURE, 7, "edx", 23,
                                                             "avx512-fp16")
    assert f.why == "TDX doesn't support requested feature"


def test_libvirt_wraps_qemu() -> None:
    found = one("error: internal error: QEMU unexpectedly closed the monitor (vm='td0'): "
                "2026-11-30T09:14:02.316907Z qemu-system-x86_64: TDX ioctl KVM_TDX_INIT_VM "
                "failed, hw_errors: 0xc000010000000041: Invalid argument")
    assert [f.source for f in found] == ["libvirt", "libvirt"]
    assert found[1].value == 0xC000010000000041


@pytest.mark.parametrize("line", [
    "Error booting VM: VmBoot(InitializeTdxVm(InitializeTdx(Os { code: 22, kind: InvalidInput, "
    "message: \"Invalid argument\" })))",
    "cloud-hypervisor: 0.2s: <vmm> ERROR:vmm/src/lib.rs:731 -- Failed to initialize TDX: "
    "Invalid argument (os error 22)",
])
def test_cloud_hypervisor(line: str) -> None:
    [f] = one(line)
    assert (f.kind, f.value, f.source) == (Kind.ERRNO, errno.EINVAL, "cloud-hypervisor")


@pytest.mark.parametrize("line", ["TDH.MNG.INIT failed with status: 0xc000010000000045",
                                  "hv: TDH.MNG.INIT failed with status: c000010000000045"])
def test_hypervisor_status_with_or_without_0x(line: str) -> None:
    [f] = one(line)
    assert (f.kind, f.value, f.seamcall, f.source) == (Kind.STATUS, 0xC000010000000045,
                                                       "TDH.MNG.INIT", "hypervisor")


def test_generic_hex_is_taken_only_when_it_reads_as_a_status() -> None:
    [f] = one("launch failed, the module said C000090400000000 somewhere")
    assert (f.source, f.value) == ("generic", 0xC000090400000000)
    assert one("RCX: ffffffffc0a1b2c3 RDX: deadbeefdeadbeef R08: 0000000000000000") == []
    [h] = one("td create: hw_error=0xc000010000000040")
    assert h.value == 0xC000010000000040


def test_errno_names_count_only_on_tdx_lines() -> None:
    [f] = one("my-vmm: tdx: init_vm: -EINVAL")
    assert (f.kind, f.value) == (Kind.ERRNO, errno.EINVAL)
    assert one("unrelated: EINVAL somewhere") == []


def test_scan_keeps_line_numbers_and_skips_blank_lines() -> None:
    found = scan("nothing here\n\nqemu: KVM_TDX_INIT_VM failed: Invalid argument\n", "log")
    assert [(f.line_no, f.origin) for f in found] == [(3, "log")]


@pytest.mark.parametrize("token, kind, value", [
    ("0xc000010000000045", Kind.STATUS, 0xC000010000000045),
    ("c000010000000045", Kind.STATUS, 0xC000010000000045),
    ("C000010000000045", Kind.STATUS, 0xC000010000000045),
    ("TDX_OPERAND_INVALID", Kind.STATUS, 0xC000010000000000),
    ("EINVAL", Kind.ERRNO, errno.EINVAL),
    ("-EIO", Kind.ERRNO, errno.EIO),
    ("-22", Kind.ERRNO, 22),
    ("Invalid argument", Kind.ERRNO, errno.EINVAL),
])
def test_tokens(token: str, kind: Kind, value: int) -> None:
    f = classify_token(token)
    assert f is not None and (f.kind, f.value) == (kind, value)


def test_not_a_token() -> None:
    assert classify_token("hello") is None
    assert classify_token("qemu.log") is None
    assert classify_token("abcdefabcdefabcdefab") is None  # 80 bits: no status


def test_read_input_token_file_and_stdin(tmp_path: Path) -> None:
    assert read_input("0x8000020300000000").findings()[0].value == 0x8000020300000000
    log = tmp_path / "q.log"
    log.write_text("qemu: KVM_TDX_INIT_VM failed: Resource temporarily unavailable\n")
    [f] = read_input(str(log)).findings()
    assert f.value == errno.EAGAIN and f.origin == str(log)
    [g] = read_input("-", io.StringIO("x: KVM_TDX_INIT_VM failed: Bad address\n")).findings()
    assert g.value == errno.EFAULT and g.origin == "-"


def test_read_input_names_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.log: neither a TDX status"):
        read_input(str(tmp_path / "nope.log"))
    with pytest.raises(DataError, match=r"^abcdefabcdefabcdefab: neither a TDX status"):
        read_input("abcdefabcdefabcdefab")

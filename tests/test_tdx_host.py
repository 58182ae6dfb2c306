"""What users run on a real TDX host: verify, init-vm, probe and diff against the live kernel.

These skip (with the reason) on hosts whose KVM has no KVM_X86_TDX_VM, which is
every machine the project's CI has; on a TDX host they are the end-to-end proof.
They hold only what any kernel must do (the structural rules, hygiene, the
spec's invariant) or what the tool must do (schemas, exit codes, closing every
fd), since the module build and kernel policy of the host are not known here.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from helpers import bypass_request, parse_ktap, run_cli, write_request

from kvmtdx import layout
from kvmtdx.device import Kvm
from kvmtdx.model import builders
from kvmtdx.outcome import Kind
from kvmtdx.structs import InitVm

pytestmark = [pytest.mark.tdx, pytest.mark.usefixtures("real_tdx", "no_fd_leak")]

# Rules every kernel from 6.16 on keeps, whatever its module and policy.
MUST_PASS = (
    "tdx_available",
    "caps_grow_and_retry",
    "caps_flags_rejected",
    "caps_hw_error_rejected",
    "caps_e2big_buffer_untouched",
    "caps_two_calls_equal",
    "init_vm_hw_error_rejected",
    "init_vm_flags_rejected",
    "init_vm_reserved_rejected",
    "init_vm_padding_rejected",
    "init_vm_nent_over_256_rejected",
    "init_vm_second_call_rejected",
    "hygiene_tds_closed",
    "hygiene_fds_released",
    # The vCPU path of 6.16 and later: tdx_vcpu_create, tdx_vcpu_init, KVM_TDX_GET_CPUID.
    "effective_vcpu_lifecycle",
    "effective_get_cpuid_e2big",
)


def test_live_kernel_passes_the_rules_every_kernel_keeps(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "verify", "--format", "json")
    doc = json.loads(out)
    # Pass or fail depends on the kernel; the exit code must be the verdict's.
    assert rc == {"pass": 0, "fail": 1}[doc["verdict"]], out
    assert (doc["schema"], doc["kind"]) == (1, "verify") and doc["backend"].startswith("real")
    status = {c["id"]: c["status"] for c in doc["checks"]}
    failed = [i for i in MUST_PASS if status.get(i) != "pass"]
    assert not failed, f"rules every kernel keeps failed or did not run: {failed}"
    assert doc["summary"]["tds_created"] > 0


def test_live_ktap_is_strict_and_the_exit_code_follows_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "verify", "--format", "ktap")
    k = parse_ktap(out)
    assert k["plan"] > 0
    assert rc == (1 if any(not r["ok"] for r in k["results"]) else 0)


def test_init_vm_bypass_request_is_answered(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The denylist bypass of 6.16..7.3: WAITPKG steered onto row 7.0.

    Which answer is right depends on the kernel (ACCEPTED is the hole; the
    series answers KVM_REJECTED), so this asserts one of those two and never
    a module refusal of a bit KVM had hidden.
    """
    rc, out, _ = run_cli(capsys, "init-vm", "--request", write_request(tmp_path, bypass_request()))
    doc = json.loads(out)
    assert rc == 0
    # Every TDX module lists WAITPKG as allow_direct, so the module never refuses
    # it: MODULE_REJECTED would mean KVM passed on a bit it had hidden.
    assert doc["outcome"] in ("ACCEPTED", "KVM_REJECTED"), doc
    assert (doc["errno"] is None) == (doc["outcome"] == "ACCEPTED")


def test_live_probe_keeps_to_max_tds_and_diffs_clean_with_itself(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_a = tmp_path / "a.json"
    rc, _, _ = run_cli(capsys, "probe", "--max-tds", "40", "--format", "json",
                       "--output", str(out_a))
    doc = json.loads(out_a.read_text())
    assert rc == (1 if doc["failures"] else 0)
    assert doc["tds"] <= 40 and doc["bits"]
    rc, out, _ = run_cli(capsys, "diff", str(out_a), str(out_a))
    assert rc == 0, out


def test_capabilities_match_between_two_fresh_tds() -> None:
    with Kvm() as kvm:
        with kvm.create_td() as a:
            first = a.capabilities()
        with kvm.create_td() as b:
            second = b.capabilities()
    assert first == second


# ---------------------------------------------------------------------------
# The vCPU path: what the TD really gets (KVM_TDX_GET_CPUID, Linux 6.16 and later).


def _minimal(kvm: Kvm) -> InitVm:
    """The smallest request every kernel accepts: the reported XFAM, a GPAW of 48."""
    with kvm.create_td() as td:
        caps = td.capabilities()
    return builders.base_request(caps.supported_xfam, ()).init_vm


def test_live_vcpu_path_errnos_and_the_tds_cpuid() -> None:
    with Kvm() as kvm:
        req = _minimal(kvm)
        with kvm.create_td() as td:
            with pytest.raises(OSError) as early:
                td.create_vcpu(0)
            assert early.value.errno == errno.EIO  # tdx_vcpu_create: TD not initialised
            assert td.init_vm(req).kind is Kind.ACCEPTED
            with pytest.raises(OSError) as no_split:
                td.create_vcpu(0)
            assert no_split.value.errno == errno.EINVAL  # no split irqchip
            td.enable_split_irqchip()
            with td.create_vcpu(0) as vcpu:
                entries = vcpu.tdx_get_cpuid()
                short = vcpu.tdx_get_cpuid_raw(0)
    assert entries[0].function == 0 and entries[-1].function >= 0x80000000
    assert short.errno == errno.E2BIG
    assert layout.unpack_cpuid2(short.data)[0] == len(entries)  # KVM says the room it needs


def test_live_td_cpuid_reads_the_td_back(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "td-cpuid", "--format", "json")
    doc = json.loads(out)
    assert rc == 0 and doc["kind"] == "td-cpuid" and "host_identity" in doc
    assert doc["init_vm"]["outcome"] == "ACCEPTED", doc["init_vm"]
    assert doc["effective_error"] is None and doc["effective_cpuid"]
    # Bits the every-reported-bit request set but KVM never reported cannot be there.
    assert doc["hidden_in_td"] == []


def test_live_bypass_read_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Where the kernel has the hole, the TD's CPUID shows what it let through (WAITPKG,
    when the CPU has it); where it refuses, nothing is read."""
    rc, out, _ = run_cli(capsys, "init-vm", "--effective",
                         "--request", write_request(tmp_path, bypass_request()))
    doc = json.loads(out)
    assert rc == 0
    if doc["outcome"] == "ACCEPTED":
        assert doc["effective_cpuid"] is not None, doc["effective_error"]
        assert {b["name"] for b in doc["hidden_in_td"]} <= {"WAITPKG"}
    else:
        assert doc["effective_cpuid"] is None and doc["hidden_in_td"] == []

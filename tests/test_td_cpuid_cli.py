"""`kvmtdx init-vm --effective` and `kvmtdx td-cpuid`: the TD's CPUID beside the request.

On the simulated host: the denylist bypass on upstream puts WAITPKG in the TD's CPUID (the
proof of impact, named as a hidden bit in the TD); AVX512F requested without its XSAVE
state in XFAM is cleared silently, with the module's reason; the JSON carries the entries
KVM_TDX_GET_CPUID returned and every differing bit; a request KVM refuses reads nothing;
a backend without vCPU ioctls says which one failed.  Every fd is closed (no_fd_leak).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import PassThrough, bypass_request, run_cli, simulated, write_request

from kvmtdx.model import mirror
from kvmtdx.model.get_cpuid import predicted
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.report.schema import ReportKind

pytestmark = pytest.mark.usefixtures("no_fd_leak")

# The README's request: WAITPKG and AVX512F on an unflagged leaf-7 entry steered onto row
# 7.0, with XFAM 0x3 (no AVX or AVX-512 state).
BYPASS_AVX512F = {
    "attributes": "0x10000000", "xfam": "0x3",
    "cpuid": [{"function": "0x7", "index": 1, "flags": 1},
              {"function": "0x7", "index": 2, "flags": 1},
              {"function": "0x7", "index": 5, "flags": 0, "ecx": "0x20", "ebx": "0x10000"},
              {"function": "0x80000008", "index": 0, "flags": 0, "eax": "0x300000"}]}


def effective(capsys: pytest.CaptureFixture[str], tmp_path: Path, sim: str,
              request: dict[str, Any], *extra: str) -> dict[str, Any]:
    path = write_request(tmp_path, request)
    r = run_cli(capsys, "init-vm", "--simulate", sim, "--request", path, "--effective", *extra)
    assert r.rc == 0, r.err
    doc: dict[str, Any] = json.loads(r.out)
    return doc


def changes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each differing bit by name, with its change."""
    return {name: c for c in doc["cpuid_changes"] for name in c["bits"]}


def leaf7(doc: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in doc["effective_cpuid"] if (e["leaf"], e["subleaf"]) == ("0x7", 0))


def test_the_bypass_puts_waitpkg_in_the_td(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    doc = effective(capsys, tmp_path, "2.0:upstream", BYPASS_AVX512F)
    assert doc["kind"] == ReportKind.INIT_VM.value and doc["outcome"] == "ACCEPTED"
    assert int(leaf7(doc)["ecx"], 16) & 1 << 5  # WAITPKG in the TD's CPUID
    assert [b["name"] for b in doc["hidden_in_td"]] == ["WAITPKG"]
    assert "WAITPKG" not in changes(doc)  # the TD has it as asked
    # The same request on the series' kernel is refused: nothing to read.
    refused = effective(capsys, tmp_path, "2.0:rfc-v2", BYPASS_AVX512F)
    assert refused["outcome"] == "KVM_REJECTED" and refused["effective_cpuid"] is None
    assert refused["cpuid_changes"] == [] and refused["effective_error"] is None


def test_an_xfam_gated_bit_without_its_xfam_is_cleared(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    doc = effective(capsys, tmp_path, "2.0:upstream", BYPASS_AVX512F)
    avx512f = changes(doc)["AVX512F"]
    assert (avx512f["kind"], avx512f["leaf"], avx512f["subleaf"]) == ("cleared", "0x7", 0)
    assert "XFAM" in avx512f["reason"] and "5, 6, 7" in avx512f["reason"]
    assert not int(leaf7(doc)["ebx"], 16) & 1 << 16
    # F/M/S 0 in leaf 1 EAX is the host's: overridden, asked and got side by side.
    fms = next(c for c in doc["cpuid_changes"] if (c["leaf"], c["register"]) == ("0x1", "eax"))
    assert fms["kind"] == "overridden" and fms["asked"] == "0x00000000"
    assert int(fms["got"], 16) == MAX_HOST.native_fms()


def test_text_names_the_bits_and_their_reasons(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    path = write_request(tmp_path, BYPASS_AVX512F)
    r = run_cli(capsys, "init-vm", "--simulate", "2.0:upstream", "--request", path,
                "--effective", "--format", "text")
    assert r.rc == 0
    assert "requested bits KVM never reported, in the TD: 0x7.0 ECX[5] WAITPKG" in r.out
    assert "0x7.0 EBX[16] AVX512F: cleared silently (the TD's XFAM lacks bits 5, 6, 7" in r.out
    assert "from the CPU (not configurable, so not as requested):" in r.out


def test_the_entries_are_what_the_mirror_predicts(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    m, policy = load_profile("2.0"), get_policy("rfc-v2")
    req = mirror.full_request(m, MAX_HOST, policy)
    path = write_request(tmp_path, req)
    r = run_cli(capsys, "td-cpuid", "--simulate", "2.0:rfc-v2", "--request", path,
                "--format", "json")
    assert r.rc == 0, r.err
    doc = r.json()
    assert doc["kind"] == "td-cpuid" and "host_identity" in doc
    assert (doc["module"], doc["policy"], doc["host"]) == ("2.0", "rfc-v2", "max")
    want = predicted(m.tables, mirror.init_vm_prediction(m, MAX_HOST, policy, req))
    assert want is not None
    assert [(int(e["leaf"], 16), e["subleaf"], int(e["eax"], 16), int(e["edx"], 16))
            for e in doc["effective_cpuid"]] == [
        (e.function, e.index if e.flags else None, e.eax, e.edx) for e in want]
    assert doc["hidden_in_td"] == [] and doc["init_vm"]["outcome"] == "ACCEPTED"
    assert all(c["kind"] != "unexplained" for c in doc["cpuid_changes"])


def test_td_cpuid_defaults_to_every_reported_bit(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "td-cpuid", "--simulate", "2.0:upstream", "--format", "json")
    assert r.rc == 0
    doc = r.json()
    full = mirror.full_request(load_profile("2.0"), MAX_HOST, get_policy("upstream"))
    assert doc["request"]["xfam"] == f"0x{full.init_vm.xfam:016x}"
    assert len(doc["request"]["cpuid"]) == len(full.init_vm.entries)
    assert doc["init_vm"]["outcome"] == "ACCEPTED" and len(doc["effective_cpuid"]) == 89
    assert r.err == ""


def test_without_a_profile_the_differences_are_listed_unexplained(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_request(tmp_path, bypass_request())
    r = run_cli(capsys, "td-cpuid", "--backend", "test_td_cpuid_cli:plugin_upstream",
                "--request", path, "--format", "json")
    assert r.rc == 0, r.err
    doc = r.json()
    assert doc["module"] is None
    assert {c["kind"] for c in doc["cpuid_changes"]} == {"differs"}
    assert [b["name"] for b in doc["hidden_in_td"]] == ["WAITPKG"]


def test_a_backend_without_vcpus_says_which_ioctl_failed(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_request(tmp_path, bypass_request())
    r = run_cli(capsys, "td-cpuid", "--backend", "test_td_cpuid_cli:no_vcpus",
                "--request", path, "--format", "json")
    assert r.rc == 0, r.err
    doc = r.json()
    assert doc["effective_cpuid"] is None
    assert doc["effective_error"] == {"step": "KVM_CREATE_VCPU", "errno": "ENOTTY"}


class _NoVcpus(PassThrough):
    """The simulated 2.0 upstream kernel, answering KVM_CREATE_VCPU with ENOTTY (as the
    kernel-source host does)."""

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        import errno
        import os

        from kvmtdx import uapi

        if request == uapi.Ioctl.KVM_CREATE_VCPU:
            raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))
        return super().ioctl(fd, request, arg)


def no_vcpus() -> _NoVcpus:
    return _NoVcpus(simulated())


def plugin_upstream() -> object:
    """The simulated 2.0 upstream kernel as a plug-in: a device that says nothing of itself."""
    from kvmtdx.sim import SimulatedHost

    return SimulatedHost(load_profile("2.0"), MAX_HOST, get_policy("upstream"))


def test_init_vm_without_effective_is_unchanged(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    path = write_request(tmp_path, BYPASS_AVX512F)
    r = run_cli(capsys, "init-vm", "--simulate", "2.0:upstream", "--request", path)
    assert "effective_cpuid" not in r.json() and r.json()["outcome"] == "ACCEPTED"

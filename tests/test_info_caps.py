"""`kvmtdx info` and `kvmtdx caps` against the simulated host and small plug-in seams.

The plug-in seams (helpers.py) are loaded the way a user's are: `--backend helpers:no_tdx`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import run_cli as run

from kvmtdx import cli
from kvmtdx.hostinfo import read_capabilities
from kvmtdx.model import catalog
from kvmtdx.session import open_backend
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import REGISTERS

# ---------------------------------------------------------------------------
# info


def test_info_simulated_tdx_host_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "info", "--simulate", "2.0:rfc-v2", "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["tdx_available"] is True and doc["simulated"] is True
    assert doc["vm_types"] == [0, 5] and doc["kvm_api_version"] == 12
    assert {"kvm_api_version", "vm_types", "tdx_available", "reason", "kernel_release",
            "cpu_model", "native_cpuid"} <= set(doc)
    assert err == ""


def test_info_without_kvm_exits_4(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "info", "--backend", "helpers:no_kvm", "--format", "json")
    assert rc == 4
    doc = json.loads(out)
    assert doc["kvm_api_version"] is None and doc["vm_types"] == []
    assert doc["reason"].startswith("no /dev/kvm")
    assert "--simulate" in err and err.count("\n") == 1


def test_info_without_tdx_vm_type_exits_4_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "info", "--backend", "helpers:no_tdx")
    assert rc == 4
    assert "KVM_X86_TDX_VM" in out and "KVM_X86_DEFAULT_VM (0)" in out
    assert "does not offer KVM_X86_TDX_VM" in err


def test_info_permission_denied_skips_naming_the_fix(capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    """kselftest: a test that cannot run for want of a resource is a skip (4), not a fail."""
    rc, out, err = run(capsys, "info", "--backend", "helpers:denied", "--format", "json")
    assert rc == 4
    doc = json.loads(out)
    assert "permission denied" in doc["reason"] and "usermod -aG kvm" in doc["reason"]
    assert err.startswith("kvmtdx: skip: ") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["verify", "probe", "caps"])
def test_permission_denied_skips_every_command_naming_the_fix(
        capsys: pytest.CaptureFixture[str], command: str) -> None:
    rc, out, err = run(capsys, command, "--backend", "helpers:denied", "--format", "json")
    assert rc == 4, err
    said = out + err
    assert "permission denied" in said and "usermod -aG kvm" in said


@pytest.mark.parametrize("command", ["info", "caps"])
def test_a_kvm_api_version_other_than_12_is_a_failure_not_a_skip(
        capsys: pytest.CaptureFixture[str], command: str) -> None:
    rc, _, err = run(capsys, command, "--backend", "helpers:old_api")
    assert rc == 1
    assert err == "kvmtdx: error: unexpected KVM API version 11 (want 12)\n"


def test_info_output_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "info.json"
    rc, out, _ = run(capsys, "info", "--simulate", "2.0", "--format", "json",
                     "--output", str(target))
    assert rc == 0 and out == ""
    assert json.loads(target.read_text())["tdx_available"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["info.json"]


def test_info_native_cpuid_hint_names_modprobe(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmtdx import hostinfo

    monkeypatch.setattr(hostinfo, "CPUID_DEVICE", "/nonexistent/cpu/{cpu}/cpuid")
    n = hostinfo.native_cpuid_source()
    assert not n.present and "modprobe cpuid" in n.hint


def test_cpu_model_from_cpuinfo(tmp_path: Path) -> None:
    from kvmtdx.hostinfo import cpu_model

    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU @ 2GHz\n")
    assert cpu_model(str(f)) == "Test CPU @ 2GHz"


# ---------------------------------------------------------------------------
# caps


def test_caps_simulated_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "caps", "--simulate", "2.0:rfc-v2", "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["supported_attrs"] == "0x0000000010000000"
    assert doc["names"]["supported_attrs"] == ["SEPT_VE_DISABLE"]
    assert "AMX_XTILEDATA" in doc["names"]["supported_xfam"]
    assert doc["user_tdvmcallinfo_1_r11"] == "0x0000000000000002"
    for key in ("kernel_tdvmcallinfo_1_r11", "kernel_tdvmcallinfo_1_r12",
                "user_tdvmcallinfo_1_r12"):
        assert doc[key] == "0x0000000000000000"
    assert len(doc["cpuid"]) == doc["nent"] == 28
    for e, names in zip(doc["cpuid"], doc["names"]["cpuid"], strict=True):
        assert set(e) == {"function", "index", "flags", "eax", "ebx", "ecx", "edx"}
        for r in REGISTERS:
            assert bool(names[r]) == bool(e[r])
    # Grow and retry from 6 entries: 6, 12, 24 fail with E2BIG, 48 succeeds.
    assert doc["ioctls"] == 7 and doc["tds_created"] == 1


def test_caps_text_names_every_set_bit(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "caps", "--simulate", "2.0:upstream")
    assert rc == 0
    assert "SEPT_VE_DISABLE" in out
    leaf7 = out.split("leaf 0x7.0\n", 1)[1]
    ebx_line = next(ln for ln in leaf7.splitlines() if ln.strip().startswith("ebx"))
    # upstream's denylist hides HLE and RTM; RDT-M (CQM) and RDT-A stay.
    assert "CQM" in ebx_line and "RDT_A" in ebx_line and "HLE" not in ebx_line
    # Every set bit has a real name: no "bitN" fallback anywhere in the report.
    assert re.search(r"\bbit\d+\b", out) is None


def test_caps_reads_every_row_with_named_bits() -> None:
    backend = open_backend(simulate="2.0:upstream")
    reading = read_capabilities(backend, start_nent=1)
    assert isinstance(backend.seam, SimulatedHost)
    assert backend.seam.open_fds == ()  # every fd closed again
    caps = reading.caps
    assert len(caps.entries) == 28
    for e in caps.entries:
        for r, v in zip(REGISTERS, e.regs(), strict=True):
            assert len(catalog.bit_names(e.function, e.index, r, v)) == bin(v).count("1")
    # From 1: 1, 2, 4, 8, 16 are too small, 32 fits.
    assert reading.counters.ioctls == 3 + 6


def test_caps_without_tdx_exits_4_naming_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "caps", "--backend", "helpers:no_tdx")
    assert rc == 4 and out == ""
    assert "KVM_X86_TDX_VM" in err and "--simulate" in err and err.count("\n") == 1


def test_caps_bad_arguments_exit_2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "caps", "--simulate", "no-such-module")
    assert rc == 2 and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        cli.main(["caps", "--format", "xml"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1

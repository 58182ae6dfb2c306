"""Every report of a run says which host it ran on: machine, kernel, CPU, TDX module, policy."""

from __future__ import annotations

import json
import platform
import socket
from pathlib import Path

import pytest
from helpers import NoTdxKvm, run_cli

from kvmtdx.identity import identify, read_cpu, tdx_module_version
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.report.encode import host_identity_json
from kvmtdx.report.schema import ENVELOPE, RUN_KINDS, ReportKind, envelope
from kvmtdx.session import Backend, simulated_backend

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
stepping\t: 8

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 7
model\t\t: 1
model name\t: not the first CPU
stepping\t: 0
"""


def test_the_cpu_is_the_first_processor_with_family_model_stepping_in_hex(
        tmp_path: Path) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text(CPUINFO)
    cpu = read_cpu(str(f))
    assert (cpu.vendor, cpu.family, cpu.model, cpu.stepping) == ("GenuineIntel", 6, 143, 8)
    assert cpu.model_name == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu.fms == "06-8f-08"


def test_a_machine_without_cpuinfo_has_a_name_and_no_fms(tmp_path: Path) -> None:
    cpu = read_cpu(str(tmp_path / "absent"))
    assert cpu.model_name and cpu.fms is None and cpu.family is None and cpu.vendor is None


@pytest.mark.parametrize(("content", "version", "why"), [
    ("1.5.06\n", "1.5.06", None),
    ("2.0.02", "2.0.02", None),
    ("garbage text\n", None, "unexpected content"),
    ("", None, "unexpected content"),
])
def test_the_module_version_is_read_from_the_tdx_host_device(
        tmp_path: Path, content: str, version: str | None, why: str | None) -> None:
    f = tmp_path / "version"
    f.write_text(content)
    got, source = tdx_module_version(str(f))
    assert got == version
    assert source == str(f) if why is None else why in source


def test_a_kernel_without_the_attribute_says_so(tmp_path: Path) -> None:
    got, source = tdx_module_version(str(tmp_path / "none"))
    assert got is None and "not exposed by this kernel" in source


def test_a_simulated_run_names_its_module_policy_mutant_and_host() -> None:
    backend = simulated_backend(load_profile("1.5-late"), MAX_HOST, get_policy("rfc-v2"),
                                mutant="allowlist_skips_row_7_1")
    ident = identify(backend)
    assert ident.simulated is not None
    assert (ident.simulated.module, ident.simulated.policy, ident.simulated.mutant,
            ident.simulated.host) == ("1.5-late", "rfc-v2", "allowlist_skips_row_7_1", "max")
    assert (ident.tdx_module, ident.tdx_module_source) == ("1.5-late", "simulated")
    assert (ident.policy, ident.policy_source) == ("rfc-v2", "the simulated host's")
    assert ident.backend == backend.label
    assert ident.hostname == socket.gethostname()
    assert ident.kernel_release == platform.release()


def test_a_device_run_reads_the_machine(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    (tmp_path / "version").write_text("1.5.06\n")
    ident = identify(Backend(seam=NoTdxKvm(), label="backend x:y"),
                     cpuinfo=str(tmp_path / "cpuinfo"), module_version=str(tmp_path / "version"))
    assert ident.simulated is None
    assert (ident.tdx_module, ident.tdx_module_source) == ("1.5.06", str(tmp_path / "version"))
    assert ident.cpu.fms == "06-8f-08"
    assert ident.policy is None and "no policy" in ident.policy_source
    doc = host_identity_json(ident)
    assert doc["cpu"]["fms"] == "06-8f-08" and doc["tdx_module"]["version"] == "1.5.06"
    assert doc["simulated"] is None and doc["backend"] == "backend x:y"


def test_the_envelope_takes_an_identity_for_runs_only() -> None:
    ident = {"hostname": "h"}
    doc = envelope(ReportKind.VERIFY, {"verdict": "pass", "host_identity": "stale"}, ident)
    assert list(doc) == [*ENVELOPE, "host_identity", "verdict"]
    assert doc["host_identity"] == ident
    with pytest.raises(ValueError):
        envelope(ReportKind.PROBE, {})
    with pytest.raises(ValueError):
        envelope(ReportKind.DIFF, {}, ident)
    assert {k.value for k in RUN_KINDS} == {"info", "caps", "init-vm", "verify", "probe",
                                            "fuzz"}


def test_verify_judged_by_auto_names_the_chosen_policy_and_why(
        capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "verify", "--simulate", "2.0:upstream-6.16", "--format", "json")
    assert r.rc == 1, r.err
    ident = r.json()["host_identity"]
    assert ident["policy"]["name"] == "upstream-6.16"
    assert ident["policy"]["source"].startswith("auto: upstream-6.16")
    assert ident["simulated"] == {"module": "2.0", "policy": "upstream-6.16", "mutant": None,
                                  "host": "max"}
    assert ident["tdx_module"] == {"version": "2.0", "source": "simulated"}


def test_also_writes_the_same_run_in_more_formats(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    js, xml = tmp_path / "v.json", tmp_path / "v.xml"
    r = run_cli(capsys, "verify", "--simulate", "2.0:upstream", "--format", "ktap",
                "--also", f"json:{js}", "--also", f"junit:{xml}")
    assert r.rc == 1, r.err
    doc = json.loads(js.read_text())
    assert "host_identity" in doc
    failed_ktap = {line.split()[-1] for line in r.out.splitlines() if line.startswith("not ok")}
    failed_json = {c["id"] for c in doc["checks"] if c["status"] == "fail"}
    # The three denylist bypass checks and the WARN on a malformed leaf 0x1F.
    assert failed_ktap == failed_json and len(failed_json) == 4
    assert xml.read_text().count("<failure") == 4


def test_also_refuses_an_unknown_format_in_one_line(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    r = run_cli(capsys, "verify", "--simulate", "2.0", "--also", f"xml:{tmp_path / 'x'}")
    assert r.rc == 2
    assert "--also" in r.err and "FORMAT:FILE" in r.err and r.err.count("\n") == 1


def test_probe_also_writes_its_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    js = tmp_path / "p.json"
    r = run_cli(capsys, "probe", "--simulate", "2.0:rfc-v2", "--also", f"json:{js}")
    assert r.rc == 0, r.err
    assert r.out.startswith("kvmtdx probe:")
    assert json.loads(js.read_text())["host_identity"]["simulated"]["policy"] == "rfc-v2"

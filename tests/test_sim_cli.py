"""`kvmtdx init-vm`, `--simulate list` on every command, and `--backend` with a simulated host.

The factory below (and helpers.py's fake seams) load the way a user's do (`--backend
module:factory`); pytest puts tests/ on sys.path, so this module is importable by its name.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import run_cli as run
from helpers import write_request

from kvmtdx import cli
from kvmtdx.errors import DataError
from kvmtdx.model import mirror
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.report.schema import ENVELOPE
from kvmtdx.session import load_plugin, open_backend
from kvmtdx.sim import CATALOGUE, MUTANTS, SimulatedHost
from kvmtdx.structs import CpuidEntry

THIS = __name__
MODULE = load_profile("2.0")
LAST: list[SimulatedHost] = []


def rfc_host() -> SimulatedHost:
    """A plug-in backend: the simulated host, built by user code."""
    sim = SimulatedHost(MODULE, MAX_HOST, get_policy("rfc-v2"), key_ids=1)
    LAST.append(sim)
    return sim


def full(policy: str) -> Request:
    return mirror.full_request(MODULE, MAX_HOST, get_policy(policy))


def with_entry_reg(req: Request, leaf: int, index: int, reg: str, value: int) -> Request:
    iv = req.init_vm
    entries = tuple(e.with_reg(reg, value) if (e.function, e.index) == (leaf, index) else e
                    for e in iv.entries)
    return Request(init_vm=replace(iv, entries=entries))


def entry(req: Request, leaf: int, index: int) -> CpuidEntry:
    return next(e for e in req.init_vm.entries if (e.function, e.index) == (leaf, index))


OUTCOME_KEYS = ["outcome", "errno", "hw_error", "check", "leaf", "subleaf", "register", "bit"]


def test_init_vm_accepts_a_valid_request(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                         no_fd_leak: object) -> None:
    rc, out, err = run(capsys, "init-vm", "--simulate", "2.0:rfc-v2", "--request",
                       write_request(tmp_path, full("rfc-v2")))
    assert (rc, err) == (0, "")
    doc = json.loads(out)
    assert list(doc) == [*ENVELOPE, "host_identity", *OUTCOME_KEYS, "hw_error_decoded",
                         "kernel_warn", "vm_bugged", "key_ids"]
    assert doc["kernel_warn"] is False and doc["vm_bugged"] is None  # counted; not -EIO
    assert doc["kind"] == "init-vm"
    assert doc["outcome"] == "ACCEPTED" and doc["errno"] is None
    assert doc["check"] is None and doc["hw_error_decoded"] is None
    # The simulated host counts its TDX key IDs: the TD kept one until it was closed.
    k = doc["key_ids"]
    assert k["free_after_calls"] == k["free_before"] - 1 == k["free_after_close"] - 1


def test_init_vm_reports_kvm_and_module_rejections(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    # 7.0 EDX PCONFIG: the module takes it, rfc-v2's allowlist does not.
    hidden = with_entry_reg(full("rfc-v2"), 7, 0, "edx", entry(full("rfc-v2"), 7, 0).edx | 1 << 18)
    rc, out, _ = run(capsys, "init-vm", "--simulate", "2.0:rfc-v2", "--request",
                     write_request(tmp_path, hidden))
    assert rc == 0
    assert json.loads(out)["outcome"] == "KVM_REJECTED"
    # Same request on a kernel whose allowlist check forgets 7.0 EDX: accepted.
    rc, out, _ = run(capsys, "init-vm", "--simulate", "2.0:rfc-v2:allowlist_skips_7_0_edx",
                     "--request", write_request(tmp_path, hidden))
    assert json.loads(out)["outcome"] == "ACCEPTED"
    bad_fms = with_entry_reg(full("upstream"), 1, 0, "eax", 0x12345)
    rc, out, _ = run(capsys, "init-vm", "--simulate", "2.0", "--request",
                     write_request(tmp_path, bad_fms))
    doc = json.loads(out)
    assert rc == 0 and doc["outcome"] == "MODULE_REJECTED" and doc["errno"] == "EINVAL"
    assert doc["hw_error"] == "0xc000010000000045"
    assert doc["hw_error_decoded"] == {"status": "TDX_OPERAND_INVALID", "operand": 69,
                                       "operand_name": "CPUID_CONFIG"}
    rc, out, _ = run(capsys, "init-vm", "--simulate", "2.0", "--request",
                     write_request(tmp_path, bad_fms), "--format", "text")
    assert rc == 0
    assert "MODULE_REJECTED" in out and "CPUID_CONFIG" in out and "TDs created 1" in out


def test_init_vm_with_the_callers_hw_error_is_a_kvm_rejection(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    req = Request(init_vm=full("upstream").init_vm, hw_error=5)
    rc, out, _ = run(capsys, "init-vm", "--simulate", "2.0", "--request",
                     write_request(tmp_path, req))
    doc = json.loads(out)
    assert (rc, doc["outcome"], doc["hw_error"]) == (0, "KVM_REJECTED", "0x0000000000000000")


def test_init_vm_with_a_lying_nent_reads_zeroed_room(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    iv = full("upstream").init_vm
    req = Request(init_vm=replace(iv, nent=len(iv.entries) + 3))
    rc, out, _ = run(capsys, "init-vm", "--simulate", "2.0", "--request",
                     write_request(tmp_path, req))
    predicted = mirror.predict_init_vm(MODULE, MAX_HOST, get_policy("upstream"), req)
    assert rc == 0 and json.loads(out)["outcome"] == predicted.kind.value == "KVM_REJECTED"


def test_init_vm_through_a_plugin_backend(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                          no_fd_leak: object) -> None:
    assert isinstance(load_plugin(f"{THIS}:rfc_host"), SimulatedHost)
    path = write_request(tmp_path, full("rfc-v2"))
    out_file = tmp_path / "out.json"
    rc, out, err = run(capsys, "init-vm", "--backend", f"{THIS}:rfc_host", "--request", path,
                       "--output", str(out_file))
    assert (rc, out) == (0, "")
    assert err == f"kvmtdx init-vm: KVM_TDX_INIT_VM ACCEPTED -> {out_file}\n"
    assert json.loads(out_file.read_text())["outcome"] == "ACCEPTED"
    sim = LAST[-1]
    # The TD was closed, so its key ID came back, and no simulated fd is left open.
    assert sim.open_fds == () and sim.free_key_ids == 1 and sim.live_tds == 0


def test_init_vm_input_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"attributes": 0, "xfam": "zero", "cpuid": []}')
    rc, out, err = run(capsys, "init-vm", "--simulate", "2.0", "--request", str(bad))
    assert rc == 2 and out == "" and "xfam" in err and str(bad) in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = run(capsys, "init-vm", "--simulate", "2.0")
    assert rc == 2 and "--request" in err
    rc, _, err = run(capsys, "init-vm", "--simulate", "2.0:rfc-v2:no_such_bug", "--request",
                     write_request(tmp_path, full("rfc-v2")))
    assert rc == 2 and "no_such_bug" in err
    rc, _, err = run(capsys, "init-vm", "--simulate", "9.9", "--request",
                     write_request(tmp_path, full("rfc-v2")))
    assert rc == 2 and "9.9" in err


def test_init_vm_without_tdx_skips(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, err = run(capsys, "init-vm", "--backend", "helpers:no_kvm", "--request",
                       write_request(tmp_path, full("upstream")))
    assert rc == 4 and out == ""
    assert err.startswith("kvmtdx: skip:") and "--simulate" in err


def commands_with_simulate() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(name for name, p in sub.choices.items()
                  if any("--simulate" in a.option_strings for a in p._actions))


def test_simulate_is_offered_where_a_kernel_is_talked_to() -> None:
    assert commands_with_simulate() == ["caps", "explain", "fuzz", "info", "init-vm", "probe",
                                        "verify"]


@pytest.mark.parametrize("command", commands_with_simulate())
def test_simulate_list_from_every_command(command: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, command, "--simulate", "list", "--format", "json")
    assert (rc, err) == (0, "")
    doc = json.loads(out)
    assert doc["modules"] == ["1.5.01", "1.5-late", "2.0"]
    assert doc["policies"] == ["upstream-6.16", "upstream", "rfc-v2"]
    assert doc["mutants"] == [{"name": m.name, "description": m.description,
                               "policies": list(m.policies)} for m in CATALOGUE]
    rc, out, _ = run(capsys, command, "--simulate", "list")
    assert rc == 0
    assert "rfc-v2" in out and all(n in out for n in MUTANTS)


def test_every_listed_choice_opens(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "verify", "--simulate", "list", "--format", "json")
    assert rc == 0
    doc = json.loads(out)
    for module in doc["modules"]:
        for policy in doc["policies"]:
            assert open_backend(simulate=f"{module}:{policy}").simulated
    for m in doc["mutants"]:
        backend = open_backend(simulate=f"2.0:{m['policies'][0]}:{m['name']}")
        assert backend.simulation is not None and backend.simulation.mutant == m["name"]
        assert m["name"] in backend.label


@pytest.mark.parametrize("command", ["verify", "probe", "caps", "info"])
def test_a_mutant_of_another_policy_is_refused_naming_its_policies(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A denylist bug under the allowlist kernel changes nothing: a run that passed with it
    would say nothing about the mutant, so it is an input error, not a silent pass."""
    rc, out, err = run(capsys, command, "--simulate", "2.0:rfc-v2:denylist_hle_not_rtm")
    assert (rc, out) == (2, "")
    assert err.count("\n") == 1 and "denylist_hle_not_rtm" in err
    assert "upstream, upstream-6.16" in err and "rfc-v2" in err
    with pytest.raises(DataError, match=r"2\.0:upstream:denylist_hle_not_rtm"):
        open_backend(simulate="2.0:rfc-v2:denylist_hle_not_rtm")
    # Every mutant opens under each policy it names, and under no other.
    for mutant in CATALOGUE:
        for policy in ("upstream-6.16", "upstream", "rfc-v2"):
            spec = f"2.0:{policy}:{mutant.name}"
            if policy in mutant.policies:
                assert open_backend(simulate=spec).simulated
            else:
                with pytest.raises(DataError, match=mutant.name):
                    open_backend(simulate=spec)


def test_caps_on_the_simulated_rfc_v2_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "caps", "--simulate", "2.0:rfc-v2", "--format", "json")
    assert (rc, err) == (0, "")
    doc = json.loads(out)
    assert doc["nent"] == len(MODULE.rows) and doc["tds_created"] == 1
    leaf7 = next(e for e in doc["cpuid"] if (e["function"], e["index"]) == (7, 0))
    assert leaf7["edx"] & 1 << 30 and not leaf7["edx"] & 1 << 18  # CORE_CAPABILITIES, PCONFIG

"""`kvmtdx predict` end to end, and one-line errors for bad request, profile and allowlist files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import bypass_request, run_cli, write_request

from kvmtdx.cli import main
from kvmtdx.errors import DataError
from kvmtdx.model.mirror import full_request
from kvmtdx.model.policy import get_policy, load_allowlist
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.model.requests import Request, load_request, request_from_json, request_to_json
from kvmtdx.structs import CpuidEntry, InitVm

INIT_VM_KEYS = {"outcome", "errno", "hw_error", "check", "leaf", "subleaf", "register", "bit",
                "module"}
CAPS_KEYS = {"supported_attrs", "supported_xfam", "kernel_tdvmcallinfo_1_r11",
             "user_tdvmcallinfo_1_r11", "kernel_tdvmcallinfo_1_r12", "user_tdvmcallinfo_1_r12",
             "cpuid"}


def write(path: Path, data: Any) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_predict_text_shows_what_each_policy_hides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "predict", "--module", "2.0", "--policy", "rfc-v2")
    assert code == 0 and err == ""
    assert "KVM_TDX_CAPABILITIES: 28 entries" in out
    assert "rfc-v2-reconstructed" in out and "RECONSTRUCTED" in out
    caps = out.split("KVM_TDX_CAPABILITIES", 1)[1]
    assert "CORE_CAPABILITIES" in caps and "WAITPKG" not in caps and "MWAIT" not in caps
    code, out, _ = run_cli(capsys, "predict", "--module", "2.0")  # default policy: upstream
    caps = out.split("KVM_TDX_CAPABILITIES", 1)[1]
    assert code == 0 and "policy  upstream " in out
    assert "MWAIT" in caps and "WAITPKG" not in caps and " HLE" not in caps


def test_predict_json_gives_capabilities_by_uapi_field_names(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "predict", "--module", "1.5.01", "--policy", "upstream",
                           "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert {"capabilities", "policy", "allowlist", "module"} <= set(doc)
    assert "init_vm" not in doc
    assert (doc["module"], doc["policy"], doc["allowlist"]) == ("1.5.01", "upstream", None)
    caps = doc["capabilities"]
    assert set(caps) == CAPS_KEYS
    assert caps["supported_attrs"] == "0x0000000010000000"
    assert caps["user_tdvmcallinfo_1_r11"] == "0x0000000000000002"
    assert len(caps["cpuid"]) == 12
    assert set(caps["cpuid"][0]) == {"function", "index", "flags", "eax", "ebx", "ecx", "edx"}
    gpaw = [e for e in caps["cpuid"] if e["function"] == 0x80000008]
    assert gpaw and gpaw[0]["eax"] >> 16 & 0xFF == 0xFF


def test_predict_bypass_accepted_upstream_refused_by_rfc_v2(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    req = write_request(tmp_path, bypass_request(), "bypass.json")
    answers = {}
    for policy in ("upstream-6.16", "upstream", "rfc-v2"):
        code, out, _ = run_cli(capsys, "predict", "--module", "2.0", "--policy", policy,
                               "--request", req, "--format", "json")
        assert code == 0
        doc = json.loads(out)
        assert set(doc["init_vm"]) == INIT_VM_KEYS
        answers[policy] = doc["init_vm"]
    assert answers["upstream"]["outcome"] == answers["upstream-6.16"]["outcome"] == "ACCEPTED"
    assert answers["upstream"]["errno"] is None
    assert answers["rfc-v2"] == {"outcome": "KVM_REJECTED", "errno": "EINVAL",
                                 "hw_error": "0x0000000000000000",
                                 "check": "allowlist", "leaf": 7, "subleaf": 0,
                                 "register": "ecx", "bit": 5, "module": None}
    code, out, _ = run_cli(capsys, "predict", "--module", "2.0", "--policy", "rfc-v2",
                           "--request", req)
    assert code == 0 and "KVM_REJECTED -EINVAL (allowlist at leaf 0x7.0 ECX bit 5)" in out
    assert "WAITPKG" in out


def test_predict_names_the_module_refusal_and_its_status(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prof, pol = load_profile("2.0"), get_policy("upstream")
    base = full_request(prof, MAX_HOST, pol)
    bad = tuple(e.with_reg("ebx", e.ebx | 1) if (e.function, e.index) == (7, 0) else e
                for e in base.init_vm.entries)  # FSGSBASE: not configurable in any module
    req = Request(init_vm=InitVm(attributes=base.init_vm.attributes, xfam=base.init_vm.xfam,
                                 entries=bad))
    path = write_request(tmp_path, req, "fsgsbase.json")
    code, out, _ = run_cli(capsys, "predict", "--module", "2.0", "--request", path,
                           "--format", "json")
    got = json.loads(out)["init_vm"]
    assert code == 0 and got["outcome"] == "MODULE_REJECTED"
    assert got["hw_error"] == "0xc000010000000045" and got["check"] == "module_cpuid_config"


def test_a_user_allowlist_replaces_the_bundled_one_and_is_named(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    al = write(tmp_path / "mine.json", {"name": "my-kernel", "provenance": "from my tree",
                                         "allowed": [{"leaf": 7, "subleaf": 0, "register": "ecx",
                                                      "bits": [5]}]})
    code, out, _ = run_cli(capsys, "predict", "--module", "2.0", "--policy", "rfc-v2",
                           "--allowlist", al, "--format", "json")
    doc = json.loads(out)
    assert code == 0
    assert doc["allowlist"] == {"name": "my-kernel", "provenance": "from my tree"}
    e7 = next(e for e in doc["capabilities"]["cpuid"] if (e["function"], e["index"]) == (7, 0))
    assert (e7["ebx"], e7["ecx"], e7["edx"]) == (0, 1 << 5, 0)


def test_predict_output_file_leaves_stdout_empty(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "p.json"
    code, out, _ = run_cli(capsys, "predict", "--module", "2.0", "--format", "json",
                           "--output", str(target))
    assert code == 0 and out == ""
    assert json.loads(target.read_text())["module"] == "2.0"


# ---------------------------------------------------------------------------
# Bad input: one line naming file and field, exit 2.

BAD_REQUESTS: list[tuple[str, Any, str]] = [
    ("notjson", "{", "not valid JSON"),
    ("list", [], "must be a JSON object"),
    ("nocpuid", {"attributes": 0, "xfam": 3}, "cpuid: missing"),
    ("badreg", {"attributes": 0, "xfam": 3,
                "cpuid": [{"function": 1}, {"function": 1}, {"function": 7, "eax": "zz"}]},
     "cpuid[2].eax"),
    ("wide", {"attributes": 0, "xfam": 3, "cpuid": [{"function": 1, "ecx": 2**32}]},
     "cpuid[0].ecx"),
    ("bool", {"attributes": True, "xfam": 3, "cpuid": []}, "attributes"),
    ("reserved", {"attributes": 0, "xfam": 3, "cpuid": [], "reserved": [0] * 11}, "reserved"),
    ("typo", {"attributes": 0, "xfam": 3, "cpuid": [{"function": 1, "subleaf": 0}]},
     "cpuid[0].subleaf"),
    ("entry", {"attributes": 0, "xfam": 3, "cpuid": [5]}, "cpuid[0]"),
    ("nofunction", {"attributes": 0, "xfam": 3, "cpuid": [{"eax": 1}]}, "cpuid[0].function"),
    ("pad", {"attributes": 0, "xfam": 3, "cpuid": [{"function": 1, "padding": [0]}]},
     "cpuid[0].padding"),
    ("top", {"attributes": 0, "xfam": 3, "cpuid": [], "flagz": 1}, "flagz"),
]


@pytest.mark.parametrize(("name", "data", "field"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_files_are_one_line_errors_naming_the_field(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, data: Any,
        field: str) -> None:
    path = write(tmp_path / f"{name}.json", data)
    with pytest.raises(DataError) as e:
        load_request(path)
    assert path in str(e.value) and field in str(e.value)
    code, out, err = run_cli(capsys, "predict", "--module", "2.0", "--request", path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("kvmtdx: error: ") and field in err
    assert "Traceback" not in err


def test_bad_profile_allowlist_and_host_files_exit_2_naming_them(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prof = write(tmp_path / "mod.json", {"name": "m", "base": "2.0", "rows": [
        {"leaf": 1, "config_direct": [0, 0, 0, 0]}]})
    code, _, err = run_cli(capsys, "predict", "--module", prof)
    assert code == 2 and err.count("\n") == 1 and "mod.json" in err and "allow_direct" in err
    # A profile runs the rules of a module version: without one named, it cannot be used.
    baseless = write(tmp_path / "old.json", {"name": "m", "rows": [
        {"leaf": 1, "config_direct": [0, 0, 0, 0], "allow_direct": [0, 0, 0, 0]}]})
    code, _, err = run_cli(capsys, "predict", "--module", baseless)
    assert code == 2 and err.count("\n") == 1 and "old.json: base: must name" in err
    twice = write(tmp_path / "twice.json", {"name": "m", "base": "2.0", "rows": [
        {"leaf": "0x7", "subleaf": 0, "config_direct": [0] * 4, "allow_direct": [0] * 4},
        {"leaf": "0x7", "subleaf": 0, "config_direct": [0] * 4, "allow_direct": [0] * 4}]})
    code, _, err = run_cli(capsys, "predict", "--module", twice)
    assert code == 2 and err.count("\n") == 1 and "twice.json" in err and "listed twice" in err
    al = write(tmp_path / "al.json", {"allowed": [{"leaf": 7, "subleaf": 0, "register": "esi",
                                                   "bits": [1]}]})
    code, _, err = run_cli(capsys, "predict", "--module", "2.0", "--policy", "rfc-v2",
                           "--allowlist", al)
    assert code == 2 and err.count("\n") == 1 and "al.json" in err and "register" in err
    with pytest.raises(DataError, match=r"al\.json"):
        load_allowlist(al)
    host = write(tmp_path / "host.json", {"cpuid": [{"leaf": 1, "eax": "x"}]})
    code, _, err = run_cli(capsys, "predict", "--module", "2.0", "--host", host)
    assert code == 2 and "host.json" in err and "cpuid[0].eax" in err


def test_predict_needs_a_known_module_and_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "predict", "--policy", "upstream")
    assert code == 2 and "--module" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "predict", "--module", "3.0")
    assert code == 2 and "3.0" in err
    with pytest.raises(SystemExit) as e:
        main(["predict", "--module", "2.0", "--policy", "nope"])
    assert e.value.code == 2


def test_a_request_reads_back_as_written() -> None:
    req = Request(
        init_vm=InitVm(attributes=1 << 28, xfam=0xE7, reserved=(0,) * 11 + (5,), nent=9,
                       cpuid_padding=3, mrowner=(1, 2, 3, 4, 5, 6),
                       entries=(CpuidEntry(7, 1, 1, 2, 3, 4, 5, (6, 7, 8)),)),
        flags=2, hw_error=0xC000010000000045,
    )
    doc = request_to_json(req)
    assert request_from_json(json.loads(json.dumps(doc)), "rt.json") == req
    assert doc["cpuid"][0]["function"] == "0x7" and doc["hw_error"] == "0xc000010000000045"


def test_a_tds_history_reads_back_and_is_predicted_call_by_call(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """"before": INIT_VM calls sent to the same TD first (a lifecycle replay)."""
    valid = Request(init_vm=InitVm(xfam=0x6DBE7, entries=(
        CpuidEntry(0x80000008, 0, 1, eax=48 << 16),)))
    req = replace(valid, before=(valid,))
    doc = request_to_json(req)
    assert request_from_json(json.loads(json.dumps(doc)), "rt.json") == req
    assert [r.before for r in req.calls] == [(), ()]
    path = tmp_path / "again.json"
    path.write_text(json.dumps(doc))
    r = run_cli(capsys, "predict", "--module", "2.0", "--policy", "upstream",
                "--request", str(path), "--format", "json")
    assert r.rc == 0 and r.json()["init_vm"]["check"] == "td_initialized"
    nested = {**doc, "before": [{**doc["before"][0], "before": []}]}
    with pytest.raises(DataError, match=r"before\[0\]\.before: an earlier call"):
        request_from_json(nested, "n.json")
    earlier = {**doc["before"][0], "cpuid": [{"function": 1, "bogus": 1}]}
    with pytest.raises(DataError, match=r"before\[0\]: cpuid\[0\]\.bogus: unknown field"):
        request_from_json({**doc, "before": [earlier]}, "b.json")
    r = run_cli(capsys, "explain", "--request", str(path), "--simulate", "2.0")
    assert r.rc == 2 and "kvmtdx init-vm --request replays it" in r.err

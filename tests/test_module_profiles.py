"""One module type and one host type: bundled profiles are the converted tables, a profile file
names its base version and may replace its rows, a host file in either layout is the same
Host the TDH.MNG.INIT model reads, and a host no module would initialise on is one error."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import host_without, run_cli

from kvmtdx.errors import DataError
from kvmtdx.model import mirror
from kvmtdx.model.host_files import host_from_json, host_to_json, load_host
from kvmtdx.model.infer import base_for, module_from_capabilities
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import (
    MAX_HOST,
    Host,
    kernel_note,
    load_profile,
    profile_from_json,
    profile_to_json,
)
from kvmtdx.model.tdx_host import HostCpu, enumerate_config, sampled_native
from kvmtdx.model.tdx_module_tables import load_tables


@pytest.mark.parametrize(("name", "version", "rows"), [
    ("1.5.01", "1.5.01", 12), ("1.5-late", "1.5.05", 18), ("2.0", "2.0.08", 28),
    ("1.5.05", "1.5.05", 18), ("2.0.08", "2.0.08", 28)])
def test_bundled_profiles_are_the_converted_tables(name: str, version: str, rows: int) -> None:
    p = load_profile(name)
    assert (p.name, p.version, len(p.rows)) == (name, version, rows)
    assert p.tables is load_tables(name)
    assert [(r.leaf, r.subleaf) for r in p.rows] == list(p.tables.row_keys())
    assert p.tables.source["commit"][:8] in p.source
    assert p.attributes_fixed0 == p.tables.attributes_fixed0


def test_only_1_5_01_lacks_topology_enumeration_and_says_so() -> None:
    assert [m for m in ("1.5.01", "1.5-late", "2.0") if not load_profile(m).enumerates_topology] \
        == ["1.5.01"]
    note = kernel_note(load_profile("1.5.01"))
    assert note is not None and "Linux 6.16 and later refuse" in note and "TOPOLOGY_ENUM" in note
    assert kernel_note(load_profile("2.0")) is None


def test_a_profile_file_runs_its_base_rules_with_its_own_rows(tmp_path: Path) -> None:
    doc = profile_to_json(load_profile("2.0"))
    assert doc["base"] == "2.0.08" and set(doc) == {"name", "source", "base", "rows"}
    row = next(r for r in doc["rows"] if (r["leaf"], r["subleaf"]) == ("0x7", 0))
    row["allow_direct"][3] = "0x00000000"  # this build allows nothing in 7.0 EDX
    doc["rows"].append({"leaf": "0x1e", "subleaf": 1, "config_direct": ["0x10"] + ["0x0"] * 3,
                        "allow_direct": ["0x0"] * 4})
    p = profile_from_json({**doc, "name": "mine"}, "mine.json")
    assert p.name == "mine" and p.version == "2.0.08" and len(p.rows) == 29
    assert "rules of module 2.0.08" in p.source
    i = p.row_index(7, 0)
    assert i is not None and p.rows[i].allow_direct[3] == 0
    # The base's own tables are untouched; the new leaf is processed after the base's.
    assert load_profile("2.0").rows[i].allow_direct[3] != 0
    extra = p.tables.lookup[-1]
    assert (extra.leaf, extra.subleaf, extra.config_index) == (0x1E, 1, 28)
    assert enumerate_config(p.tables, MAX_HOST)[28] == (0x10, 0, 0, 0)


def test_a_profile_without_rows_is_its_base(tmp_path: Path) -> None:
    p = profile_from_json({"name": "plain", "base": "1.5-late"}, "plain.json")
    assert p.tables is load_tables("1.5.05") and len(p.rows) == 18


def test_saved_profile_round_trips_through_caps(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "saved.json"
    r = run_cli(capsys, "caps", "--simulate", "2.0:upstream", "--policy", "upstream",
                "--save-module", str(out))
    assert r.rc == 0, r.err
    doc = json.loads(out.read_text())
    assert doc["kind"] == "module-profile" and doc["base"] == "2.0.08"
    saved = load_profile(str(out))
    # Without --module the rows the kernel reported are all config_direct, and the bits the
    # policy hides are unknown: HLE, RTM and WAITPKG of 7.0.
    i = saved.row_index(7, 0)
    assert i is not None and saved.unknown_mask(i)[1] == 1 << 4 | 1 << 11
    assert saved.tables.variant == load_tables("2.0").variant


def test_the_base_of_a_report_is_the_module_whose_rows_it_lists() -> None:
    for name in ("1.5.01", "1.5-late", "2.0"):
        m = load_profile(name)
        caps = mirror.predict_capabilities(m, MAX_HOST, get_policy("rfc-v2"), len(m.rows)).caps
        assert caps is not None and base_for(caps) is load_profile(name)
        saved = module_from_capabilities(caps, get_policy("rfc-v2"))
        assert saved.version == m.version
    caps = mirror.predict_capabilities(load_profile("2.0"), MAX_HOST, get_policy("upstream"),
                                       28).caps
    assert caps is not None
    with pytest.raises(DataError, match="give --module"):
        base_for(replace(caps, entries=caps.entries[:-1]))


# ---------------------------------------------------------------------------
# Hosts.


def test_one_host_type() -> None:
    assert HostCpu is Host and isinstance(MAX_HOST, Host)
    assert load_host("max") is MAX_HOST
    assert MAX_HOST.xfam_supported == 0x6DBE7  # CPUID 0xD: what the max host enumerates
    assert MAX_HOST.cpuid(0x80000008, 0) == MAX_HOST.cpuid(0x80000008, None)  # no sub-leaves
    assert MAX_HOST.cpuid(7, None) == MAX_HOST.cpuid(7, 0)
    assert MAX_HOST.cpuid(0x40000000, None) == (0, 0, 0, 0)
    assert MAX_HOST.tsc_khz == 2_100_000 and MAX_HOST.present_cpus == 112


def test_both_host_layouts_read_the_same_host(tmp_path: Path) -> None:
    bundled = host_to_json(MAX_HOST)
    assert host_from_json(bundled, "a.json").native == MAX_HOST.native
    user = {"name": "u", "tsx_ctrl": True, "ept_5level": True, "xfam_supported": "0x2e7",
            "cpuid": [{"function": "0x7", "index": 0, "ebx": "0x10"},
                      {"leaf": 1, "subleaf": None, "regs": ["0x806f8", 0, 0, 0]}]}
    h = host_from_json(user, "u.json")
    assert h.cpuid(7, 0) == (0, 0x10, 0, 0) and h.fms == 0x806F8
    assert h.xfam_supported == 0x2E7 and h.kvm_xfam == 0x2E7
    with pytest.raises(DataError, match=r"u\.json: cpuid\[0\]: give either 'regs' or eax"):
        host_from_json({"cpuid": [{"leaf": 1, "regs": [0, 0, 0, 0], "eax": 1}]}, "u.json")
    # The model reads a loaded host like the bundled one.
    loaded = host_from_json(bundled, "a.json")
    assert sampled_native(load_tables("2.0"), loaded) == sampled_native(load_tables("2.0"),
                                                                         MAX_HOST)


def test_a_host_the_module_would_not_initialise_on_is_one_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lacking = host_without("no-topology", {(0x1F, 0): {"ecx": 0xFFFF}, (0x1F, 1): {"ecx": 0xFFFF}})
    path = tmp_path / "h.json"
    path.write_text(json.dumps(host_to_json(lacking)))
    for argv in (["predict", "--module", "2.0"], ["init-vm", "--simulate", "2.0"],
                 ["verify", "--simulate", "2.0"]):
        extra = ["--request", _request(tmp_path)] if argv[0] == "init-vm" else []
        r = run_cli(capsys, *argv, "--host", str(path), *extra)
        assert r.rc == 2 and r.err.count("\n") == 1, (argv, r.err)
        assert f"--host {path}: TDX module 2.0.08 would not initialise on host no-topology: " \
               "leaf 0x1F" in r.err


def _request(tmp_path: Path) -> str:
    path = tmp_path / "req.json"
    path.write_text(json.dumps({"attributes": 0, "xfam": 3, "cpuid": [
        {"function": "0x80000008", "index": 0, "flags": 0, "eax": "0x300000"}]}))
    return str(path)


def test_predict_says_1_5_01_cannot_run_under_the_policies(
        capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "predict", "--module", "1.5.01", "--format", "json")
    assert r.rc == 0
    assert "no topology enumeration" in r.json()["notes"][0]
    assert "kvmtdx: note: Linux 6.16 and later refuse to enable TDX on module 1.5.01" in r.err
    r = run_cli(capsys, "predict", "--module", "2.0")
    assert "note" not in r.err

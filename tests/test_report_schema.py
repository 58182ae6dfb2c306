"""One schema for every JSON report: the envelope (schema, kind, tool_version) comes first."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli, write_request

from kvmtdx import __version__
from kvmtdx.model import mirror
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.report.schema import ENVELOPE, RUN_KINDS, SCHEMA, ReportKind, envelope


def _reports(capsys: pytest.CaptureFixture[str], tmp: Path) -> dict[str, dict[str, Any]]:
    """Every JSON document the commands write, by the command that wrote it."""
    request = write_request(tmp, mirror.full_request(load_profile("2.0"), MAX_HOST,
                                                     get_policy("upstream")))
    saved, allow, pa, pb = (str(tmp / n) for n in ("m.json", "a.json", "pa.json", "pb.json"))
    runs: list[tuple[str, int, list[str]]] = [
        ("info", 0, ["info", "--simulate", "2.0"]),
        ("caps", 0, ["caps", "--simulate", "2.0", "--policy", "upstream", "--save-module", saved]),
        ("predict", 0, ["predict", "--module", "2.0", "--request", request]),
        ("init-vm", 0, ["init-vm", "--simulate", "2.0", "--request", request]),
        ("td-cpuid", 0, ["td-cpuid", "--simulate", "2.0", "--request", request]),
        ("verify", 1, ["verify", "--simulate", "2.0", "--save-failures", str(tmp / "fails")]),
        ("probe", 1, ["probe", "--simulate", "2.0", "--emit-allowlist", allow, "--output", pa]),
        ("probe", 0, ["probe", "--simulate", "2.0:rfc-v2", "--output", pb]),
        ("diff", 1, ["diff", pa, pb]),
        ("policy-diff", 1, ["diff", "--module", "2.0", "--policy", "upstream",
                            "--policy", "rfc-v2"]),
        ("simulate-list", 0, ["verify", "--simulate", "list"]),
        ("check-list", 0, ["verify", "--list-checks"]),
        ("matrix", 0, ["report", "merge", pa, pb]),
        ("fuzz", 1, ["fuzz", "--simulate", "2.0:upstream:gpaw_not_forced", "--seed", "1",
                     "--first", "--no-db", "--save", str(tmp / "fuzz")]),
        ("explain", 0, ["explain", "0xc000010000000045"]),
    ]
    docs = {}
    for name, rc, argv in runs:
        r = run_cli(capsys, *argv, *(["--format", "json"] if name != "init-vm" else []))
        assert r.rc == rc, (argv, r.err)
        docs[name] = json.loads(Path(pa).read_text()) if name == "probe" else r.json()
    docs["module-profile"] = json.loads(Path(saved).read_text())
    docs["allowlist"] = json.loads(Path(allow).read_text())
    docs["request"] = json.loads(min((tmp / "fails").iterdir()).read_text())
    # A fuzz finding with a KVM_TDX_CAPABILITIES call is saved as a fuzz case.
    docs["fuzz-case"] = json.loads(min((tmp / "fuzz").iterdir()).read_text())
    return docs


def test_every_json_report_starts_with_the_envelope_naming_its_kind(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    docs = _reports(capsys, tmp_path)
    # Every kind kvmtdx declares is written by some command above (a new kind joins the list).
    assert set(docs) == {k.value for k in ReportKind}
    for kind, doc in docs.items():
        assert list(doc)[:3] == list(ENVELOPE), kind
        assert (doc["schema"], doc["kind"], doc["tool_version"]) == (SCHEMA, kind, __version__)


def test_every_run_carries_its_host_identity_after_the_envelope_and_nothing_else_does(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    docs = _reports(capsys, tmp_path)
    runs = {k.value for k in RUN_KINDS}
    for kind, doc in docs.items():
        if kind not in runs:
            assert "host_identity" not in doc, kind
            continue
        assert list(doc)[3] == "host_identity", kind
        ident = doc["host_identity"]
        assert ident["simulated"]["module"] == "2.0", kind
        assert ident["kernel_release"] and ident["hostname"] and ident["cpu"]["model_name"]
        assert ident["tdx_module"] == {"version": "2.0", "source": "simulated"}, kind
        assert ident["backend"] == doc.get("backend", ident["backend"])


def _own(doc: dict[str, Any]) -> list[str]:
    """The kind's own fields: after the envelope and, for a run, its host identity."""
    return [k for k in doc if k not in ENVELOPE and k != "host_identity"]


def test_the_kinds_own_fields_follow_unchanged(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    docs = _reports(capsys, tmp_path)
    assert _own(docs["info"])[:3] == ["backend", "simulated", "kvm_path"]
    assert _own(docs["caps"])[:2] == ["backend", "supported_attrs"]
    assert list(docs["predict"])[3:5] == ["module", "policy"]
    assert _own(docs["init-vm"])[:2] == ["outcome", "errno"]
    assert _own(docs["verify"])[:2] == ["kvmtdx", "verdict"]
    assert _own(docs["probe"])[:2] == ["backend", "module"]
    assert list(docs["diff"])[3:6] == ["a", "b", "differences"]
    assert list(docs["policy-diff"])[3:5] == ["module", "host"]
    assert list(docs["simulate-list"])[3:6] == ["modules", "policies", "mutants"]
    assert list(docs["module-profile"])[3:5] == ["name", "source"]
    assert list(docs["allowlist"])[3:5] == ["name", "provenance"]
    assert list(docs["request"])[3:6] == ["about", "attributes", "xfam"]
    assert list(docs["matrix"])[3:5] == ["runs", "checks"]
    assert _own(docs["fuzz"])[:2] == ["verdict", "backend"]
    assert list(docs["fuzz-case"])[3:5] == ["about", "calls"]
    assert _own(docs["explain"])[:2] == ["findings", "unrecognised"]


def test_the_envelope_replaces_fields_of_the_same_name_in_the_body() -> None:
    doc = envelope(ReportKind.ALLOWLIST, {"schema": 0, "kind": "x", "name": "n"})
    assert doc == {"schema": SCHEMA, "kind": "allowlist", "tool_version": __version__,
                   "name": "n"}


# 64-bit words: jq 1.6 (and any reader that parses JSON numbers as doubles) rounds integers
# past 2**53, so every report writes them as "0x" strings of 16 hex digits.
SIXTY_FOUR_BIT = frozenset({
    "hw_error", "attributes", "xfam", "supported_attrs", "supported_xfam",
    "kernel_tdvmcallinfo_1_r11", "user_tdvmcallinfo_1_r11",
    "kernel_tdvmcallinfo_1_r12", "user_tdvmcallinfo_1_r12",
    "attributes_fixed0", "attributes_fixed1", "xfam_fixed0", "xfam_fixed1", "xfam_supported",
})
HEX64 = re.compile(r"0x[0-9a-f]{16}")


def _words(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) of every field in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _words(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _words(v, f"{path}[{i}]")


def _module_refusal() -> Request:
    """A full request with a family/model/stepping the module does not take (leaf 1 EAX)."""
    full = mirror.full_request(load_profile("2.0"), MAX_HOST, get_policy("upstream"))
    entries = tuple(e.with_reg("eax", 0x12345) if (e.function, e.index) == (1, 0) else e
                    for e in full.init_vm.entries)
    return replace(full, init_vm=replace(full.init_vm, entries=entries))


def test_every_64_bit_value_in_every_report_is_a_hex_string(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    docs = _reports(capsys, tmp_path)
    refused = run_cli(capsys, "init-vm", "--simulate", "2.0:upstream", "--request",
                      write_request(tmp_path, _module_refusal(), "stray.json"))
    docs["init-vm refused"] = refused.json()
    assert docs["init-vm refused"]["hw_error"] == "0xc000010000000045"
    seen = set()
    for kind, doc in docs.items():
        for path, key, value in _words(doc):
            assert not (isinstance(value, int) and value >= 2**53), (kind, path, key, value)
            if key in SIXTY_FOUR_BIT and not isinstance(value, list):  # "names" lists names
                seen.add(key)
                # null: a value the report did not see (explain: a log line without hw_error)
                assert value is None or (isinstance(value, str) and HEX64.fullmatch(value)), (
                    kind, path, key, value)
    # (A saved module profile no longer carries fixed bits: its base module's tables do.)
    assert {"hw_error", "supported_attrs", "supported_xfam", "user_tdvmcallinfo_1_r11"} <= seen

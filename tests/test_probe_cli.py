"""`kvmtdx probe` end to end: exit codes, JSON schema, the emitted allowlist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import WARN_CHECK

from kvmtdx.cli import main
from kvmtdx.model.policy import load_allowlist


def test_probe_json_has_the_documented_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--simulate", "2.0:rfc-v2", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert (doc["schema"], doc["kind"]) == (1, "probe")
    assert doc["mode"] == "targeted" and doc["complete"] is True
    assert isinstance(doc["tds"], int) and 0 < doc["tds"] < 150
    assert isinstance(doc["ioctls"], int) and doc["ioctls"] > doc["tds"]
    bit = next(b for b in doc["bits"] if b["name"] == "MWAIT")
    assert (bit["leaf"], bit["subleaf"], bit["register"], bit["bit"], bit["class"]) == \
        ("0x1", 0, "ecx", 3, "HIDDEN_KVM_REJECTED")
    assert {"leaf", "subleaf", "register", "lo", "hi", "name", "value", "class"} <= \
        set(doc["fields"][0])
    assert err == ""  # progress goes to a terminal only


def test_probe_text_names_bits_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--simulate", "1.5.01:rfc-v2"]) == 0
    out = capsys.readouterr().out
    assert "HLE" in out and "HIDDEN_KVM_REJECTED" in out and "PASS" in out


def test_probe_fails_on_a_hazard(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--simulate", "2.0:rfc-v2:allowlist_skips_7_0_edx"]) == 1
    out = capsys.readouterr().out
    assert "PCONFIG" in out and "HIDDEN_ACCEPTED" in out and "FAIL" in out


def test_probe_stops_cleanly_when_key_ids_leak(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--simulate", "2.0:upstream:key_id_leak_on_failure"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvmtdx: error: TDX key IDs exhausted") and "\n" not in err


def test_probe_without_tdx_skips_naming_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--backend", "helpers:no_tdx"]) == 4
    err = capsys.readouterr().err.strip()
    assert "--simulate" in err and "\n" not in err


def test_max_tds_reports_incomplete(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--simulate", "2.0", "--max-tds", "5", "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["tds"] == 5 and doc["complete"] is False and doc["verdict"] == "fail"


@pytest.mark.parametrize(("option", "value"), [("--jobs", "0"), ("--max-tds", "0"),
                                               ("--max-tds", "-3"), ("--max-tds", "x")])
def test_a_count_below_one_is_a_usage_error(capsys: pytest.CaptureFixture[str], option: str,
                                            value: str) -> None:
    """Bad input exits 2 naming the option before any TD is made (--max-tds 0 once ended as
    a probe that could not go on: exit 1)."""
    with pytest.raises(SystemExit) as e:
        main(["probe", "--simulate", "2.0", option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {option}" in err and len(err.splitlines()) == 1


def test_emitted_allowlist_loads_and_verifies_clean(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "probed.json"
    # Today's kernel fails the probe's lookup traps; its per-bit table is still what it is.
    assert main(["probe", "--simulate", "2.0:upstream", "--emit-allowlist", str(path)]) == 1
    allowlist = load_allowlist(str(path))
    assert allowlist.provenance.startswith("probed from simulated TDX host")
    assert allowlist.mask(1, 0, "ecx") >> 3 & 1  # MWAIT: today's kernel gives it
    assert not allowlist.mask(7, 0, "ebx") >> 4 & 1  # HLE: it refuses it
    assert json.loads(path.read_text())["kind"] == "allowlist"
    capsys.readouterr()
    rc = main(["verify", "--simulate", "2.0:rfc-v2", "--policy", "rfc-v2",
               "--allowlist", str(path), "--format", "json"])
    fails = {c["id"] for c in json.loads(capsys.readouterr().out)["checks"]
             if c["status"] == "fail"}
    assert (rc, fails) == (1, {WARN_CHECK})  # the allowlist is clean; 7.3's WARN is not

"""What a probe may claim: nothing it could not decide, and nothing beyond what it tried.

- A run cut short (--max-tds) classified only part of the bits: it does not pass.
- The allowlist it writes never implies that a bit it did not try is blocked.
- Bits sent one at a time in well-formed requests cannot show KVM's lookup hole, so the
  probe also steers each hidden leaf-7.0 bit KVM refused onto row 7.0 through the lookup
  (the trap verify's adversarial checks send): a kernel that lets one through fails.
- KTAP and JUnit carry the same verdict, one case per probed register.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import parse_ktap, run_cli

from kvmtdx.model.policy import load_allowlist


def test_a_run_that_classified_nothing_does_not_pass(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    r = run_cli(capsys, "probe", "--simulate", "2.0:rfc-v2", "--max-tds", "1")
    assert r.rc == 1, r.err
    last = r.out.splitlines()[-1]
    assert last.startswith("INCOMPLETE: ") and " bits not classified" in last
    assert "PASS" not in r.out
    doc = run_cli(capsys, "probe", "--simulate", "2.0:rfc-v2", "--max-tds", "1",
                  "--format", "json").json()
    assert doc["verdict"] == "fail" and doc["complete"] is False
    assert doc["unclassified"] > 100 and doc["unclassified"] == doc["untested"]


def test_an_incomplete_run_fails_even_where_every_tried_bit_passed(
        capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_cli(capsys, "probe", "--simulate", "2.0:rfc-v2", "--max-tds", "30",
                  "--format", "json").json()
    assert doc["failures"] == 0 and doc["complete"] is False and doc["verdict"] == "fail"


def test_the_allowlist_of_an_incomplete_run_marks_what_it_never_tried(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "kvm.json"
    r = run_cli(capsys, "probe", "--simulate", "2.0:rfc-v2", "--max-tds", "3",
                "--emit-allowlist", str(path))
    assert r.rc == 1
    doc = json.loads(path.read_text())
    untried = {(u["leaf"], u["subleaf"], u["register"], int(b))
               for u in doc["untried"] for b in u["bits"]}
    allowed = {(a["leaf"], a["subleaf"], a["register"], int(b))
               for a in doc["allowed"] for b in a["bits"]}
    assert untried and not untried & allowed
    assert ("0x7", 0, "edx", 18) in untried  # PCONFIG: hidden, never tried here
    assert "never tried" in doc["provenance"]
    assert "never tried" in r.out and str(path) in r.out
    loaded = load_allowlist(str(path))
    assert "never tried" in loaded.provenance
    assert loaded.untried[(7, 0, "edx")] >> 18 & 1


def test_an_exhaustive_allowlist_has_nothing_untried(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    path = tmp_path / "kvm.json"
    r = run_cli(capsys, "probe", "--simulate", "2.0:rfc-v2", "--exhaustive",
                "--emit-allowlist", str(path))
    assert r.rc == 0, r.out
    doc = json.loads(path.read_text())
    assert doc["untried"] == [] and "never tried" not in doc["provenance"]


def test_the_lookup_hole_fails_the_probe_of_todays_kernel(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    r = run_cli(capsys, "probe", "--simulate", "2.0:upstream", "--format", "json")
    assert r.rc == 1
    doc = r.json()
    failing = [t for t in doc["traps"] if t["failed"]]
    assert {tuple(t["names"]) for t in failing} == {("WAITPKG",), ("HLE", "RTM")}
    assert all(t["result"]["outcome"] == "ACCEPTED" for t in failing)
    assert doc["failures"] == 2 and doc["verdict"] == "fail"
    # The per-bit classes are what they were: each bit, sent properly, is refused.
    waitpkg = next(b for b in doc["bits"] if b["name"] == "WAITPKG")
    assert waitpkg["class"] == "HIDDEN_KVM_REJECTED"
    out = run_cli(capsys, "probe", "--simulate", "2.0:upstream").out
    assert "lookup trap" in out and "WAITPKG" in out
    assert out.splitlines()[-1].startswith("FAIL: ")


@pytest.mark.parametrize("spec", ["2.0:rfc-v2", "2.0:upstream:denylist_checks_row_index",
                                  "1.5.01:rfc-v2"])
def test_a_kernel_that_refuses_every_trap_passes_and_says_what_it_tried(
        capsys: pytest.CaptureFixture[str], spec: str) -> None:
    r = run_cli(capsys, "probe", "--simulate", spec, "--format", "json")
    assert r.rc == 0, r.out
    doc = r.json()
    assert doc["traps"] and not any(t["failed"] for t in doc["traps"])
    assert all(t["result"]["outcome"] == "KVM_REJECTED" for t in doc["traps"])
    last = run_cli(capsys, "probe", "--simulate", spec).out.splitlines()[-1]
    assert last.startswith("PASS: ") and f"{len(doc['traps'])} lookup traps" in last


def test_probe_ktap_has_a_case_per_register_and_trap(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    r = run_cli(capsys, "probe", "--simulate", "2.0:upstream", "--format", "ktap")
    assert r.rc == 1
    k = parse_ktap(r.out)
    names = [x["desc"] for x in k["results"]]
    assert "cpuid_7_0_ecx" in names and "cpuid_1_0_ecx" in names
    assert "lookup_trap_7_0_ecx_waitpkg" in names and "probe_complete" in names
    failed = {x["desc"] for x in k["results"] if not x["ok"]}
    assert failed == {"lookup_trap_7_0_ecx_waitpkg", "lookup_trap_7_0_ebx_hle_rtm"}
    cut = parse_ktap(run_cli(capsys, "probe", "--simulate", "2.0:rfc-v2", "--max-tds", "5",
                             "--format", "ktap").out)
    done = {x["desc"]: x for x in cut["results"]}
    assert not done["probe_complete"]["ok"]
    assert any(x["directive"] == "SKIP" for x in cut["results"])


def test_probe_junit_counts_match_the_ktap(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "probe", "--simulate", "2.0:upstream", "--format", "junit")
    assert r.rc == 1
    root = ET.fromstring(r.out)
    assert root.get("failures") == "2"
    cases = root.findall("./testsuite/testcase")
    assert {c.get("name") for c in cases} >= {"cpuid_7_0_ecx", "lookup_trap_7_0_ecx_waitpkg"}
    k = parse_ktap(run_cli(capsys, "probe", "--simulate", "2.0:upstream",
                           "--format", "ktap").out)
    assert len(cases) == k["plan"]

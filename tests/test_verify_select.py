"""Choosing what verify runs: --list-checks, --check ID, --group NAME; and JUnit timings."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from helpers import run_cli

from kvmtdx import checks


def test_list_checks_text_and_json_need_no_device(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "verify", "--list-checks", "--backend", "helpers:denied")
    assert (r.rc, r.err) == (0, "")
    lines = r.out.splitlines()
    assert len(lines) == len(checks.CHECKS)
    for line, spec in zip(lines, checks.CHECKS, strict=True):
        cid, group, about = line.split(None, 2)
        assert (cid, group, about) == (spec.id, spec.group, spec.about)
    r = run_cli(capsys, "verify", "--list-checks", "--format", "json")
    doc = r.json()
    assert (doc["schema"], doc["kind"]) == (1, "check-list")
    assert doc["groups"] == list(checks.GROUPS)
    assert [(c["id"], c["group"], c["description"]) for c in doc["checks"]] == [
        (s.id, s.group, s.about) for s in checks.CHECKS]


def test_check_and_group_run_a_subset(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "verify", "--simulate", "2.0:upstream", "--format", "json",
                "--check", "caps_flags_rejected", "--check", "init_vm_flags_rejected",
                "--group", "policy")
    assert r.rc == 0, r.err
    ids = [c["id"] for c in r.json()["checks"]]
    policy = [s.id for s in checks.CHECKS if s.group == "policy"]
    assert ids == ["caps_flags_rejected", "init_vm_flags_rejected", *policy]
    r = run_cli(capsys, "verify", "--simulate", "2.0:upstream", "--format", "json",
                "--group", "adversarial")
    assert r.rc == 1
    assert {c["group"] for c in r.json()["checks"]} == {"adversarial"}


def test_a_check_that_judges_others_brings_them_along(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """adversarial_matches_prediction holds the trap checks' answers to the mirror: alone it
    would have none to hold, and skip."""
    r = run_cli(capsys, "verify", "--simulate", "2.0:upstream", "--format", "json",
                "--check", "adversarial_matches_prediction")
    by_id = {c["id"]: c for c in r.json()["checks"]}
    assert by_id["adversarial_matches_prediction"]["status"] == "pass"
    assert "adversarial_denylist_bypass_waitpkg" in by_id


@pytest.mark.parametrize(("option", "name"), [("--check", "caps_flags"),
                                              ("--group", "adversary")])
def test_an_unknown_check_or_group_is_named_with_the_valid_ones(
        capsys: pytest.CaptureFixture[str], option: str, name: str) -> None:
    r = run_cli(capsys, "verify", "--simulate", "2.0:upstream", option, name)
    assert (r.rc, r.out) == (2, "")
    assert r.err.count("\n") == 1 and repr(name) in r.err and option in r.err
    valid = "caps_flags_rejected" if option == "--check" else \
        "adversarial, lifecycle, effective, hygiene"
    assert valid in r.err


def test_junit_gives_each_check_its_time(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "verify", "--simulate", "2.0:rfc-v2", "--format", "junit")
    cases = ET.fromstring(r.out).findall("./testsuite/testcase")
    assert cases and all(float(c.get("time", "-1")) >= 0 for c in cases)


def test_every_check_a_check_needs_exists() -> None:
    ids = {s.id for s in checks.CHECKS}
    needs = {n for s in checks.CHECKS for n in s.needs}
    assert needs and needs <= ids

"""`kvmtdx fuzz` on the simulated host: every seeded bug found within the DEFAULT budget and
shrunk to a request of a few entries, whose replay file gives the same answer; the fixes
(the bypass closed, the WARN turned into MODULE_REJECTED) reported stricter, not as bugs;
every correct module and policy clean.

Each bug's run is `--first` (the search stops once a discrepancy is found and shrunk), which
leaves the search up to that point as the default run makes it, so "found within
--max-tds DEFAULT_TDS" is the default budget's claim.  Seed 1 makes it deterministic;
scripts/bench_fuzz.py measures other seeds and how far inside the budget each bug is found
(the whole file takes about 40 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli

from kvmtdx.cli.fuzz import DEFAULT_TDS
from kvmtdx.errors import ExitCode
from kvmtdx.fuzz.judge_init_vm import NO_WARN_NOTE
from kvmtdx.model import invariant
from kvmtdx.model.policy import POLICY_NAMES
from kvmtdx.model.profiles import BUNDLED_MODULES
from kvmtdx.sim.mutants import CATALOGUE, Mutant

BUGS = [m for m in CATALOGUE if not m.fix]
FIXES = [m for m in CATALOGUE if m.fix]
# What each fix's stricter findings say.
WHY = {"denylist_checks_row_index": invariant.HOLE_CLOSED_NOTE,
       "module_status_always_einval": invariant.WARN_FIXED_NOTE,
       "set_cpuid2_checked_against_td": invariant.SET_CPUID2_VALIDATED_NOTE}
# "A request of at most a few entries": the smallest finding of each bug has at most
# SMALLEST entries; none has more than a steered entry needs with a little company (every
# row of a multi-row leaf but one flagged: 0x18's eight on 2.0, the unflagged one, GPAW's,
# and one entry whose own refusal the steered lookup hides, or a pair of flagged entries
# out of order for the lookup to trip on).
SMALLEST = 4
MAX_ENTRIES = 11
MAX_CALLS = 3


def _spec(m: Mutant) -> str:
    return f"2.0:{m.policies[0]}:{m.name}"


def _outcome(doc: dict[str, Any]) -> tuple[str, str | None, str]:
    return doc["outcome"], doc["errno"], doc["hw_error"]


@pytest.mark.parametrize("mutant", BUGS, ids=[m.name for m in BUGS])
def test_every_seeded_bug_is_found_within_the_default_budget_and_replays(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, mutant: Mutant) -> None:
    spec = _spec(mutant)
    r = run_cli(capsys, "fuzz", "--simulate", spec, "--seed", "1", "--first", "--no-db",
                "--max-tds", str(DEFAULT_TDS), "--format", "json", "--save", str(tmp_path))
    assert r.rc == ExitCode.FAIL, f"{mutant.name} not found in {DEFAULT_TDS} TDs"
    doc = r.json()
    failing = [f for f in doc["findings"] if f["failing"]]
    assert failing and min(f["found_after_tds"] for f in failing) <= DEFAULT_TDS
    sizes = []
    for f in failing:
        assert f["reproduced"], f
        assert len(f["calls"]) <= MAX_CALLS, f["calls"]
        entries = [len(c["init_vm"]["cpuid"]) for c in f["calls"] if "init_vm" in c]
        sizes.append(max(entries, default=0))
        assert sizes[-1] <= MAX_ENTRIES, f["calls"]
        _replays(capsys, spec, str(tmp_path / f["replay"]), f)
    assert min(sizes) <= SMALLEST, sizes


def _replays(capsys: pytest.CaptureFixture[str], spec: str, path: str,
             f: dict[str, Any]) -> None:
    """The finding's replay file shows the same thing again: through init-vm where its
    answer says it (an outcome, the key IDs kept), else through fuzz --replay (a
    KVM_TDX_CAPABILITIES call, the TD's CPUID)."""
    if f["call"] in ("init_vm", "key_ids", "kernel_warn"):
        got = run_cli(capsys, "init-vm", "--simulate", spec, "--request", path).json()
        if f["call"] == "init_vm":
            assert _outcome(got) == _outcome(f["observed"]), (f, got)
        elif f["call"] == "kernel_warn":
            assert got["kernel_warn"] is ("no kernel WARN" not in f["actual"]), (f, got)
        else:
            keys = got["key_ids"]
            held = keys["free_before"] - (keys["free_after_calls"] if "after call" in
                                          f["actual"] else keys["free_after_close"])
            assert f"{held} key IDs held" in f["actual"], (f, keys)
        return
    again = run_cli(capsys, "fuzz", "--simulate", spec, "--replay", path, "--format", "json")
    assert again.rc == ExitCode.FAIL and \
        f["actual"] in [g["actual"] for g in again.json()["findings"]], again.out


@pytest.mark.parametrize("fix", FIXES, ids=[m.name for m in FIXES])
def test_a_fix_runs_the_default_budget_with_stricter_findings_only(
        capsys: pytest.CaptureFixture[str], fix: Mutant) -> None:
    r = run_cli(capsys, "fuzz", "--simulate", _spec(fix), "--seed", "1", "--no-db",
                "--format", "json")
    doc = r.json()
    assert r.rc == ExitCode.PASS and doc["budget"]["max_tds"] == DEFAULT_TDS
    assert doc["summary"]["tds"] == DEFAULT_TDS and doc["summary"]["failing"] == 0
    assert doc["findings"] and {f["verdict"] for f in doc["findings"]} == {"stricter"}
    notes = {f["note"] for f in doc["findings"]}
    assert WHY[fix.name] in notes and notes <= set(WHY.values()) | {invariant.STRICTER_NOTE,
                                                                     NO_WARN_NOTE}


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_every_correct_module_and_policy_runs_clean(capsys: pytest.CaptureFixture[str],
                                                   module: str, policy: str) -> None:
    r = run_cli(capsys, "fuzz", "--simulate", f"{module}:{policy}", "--seed", "3", "--no-db",
                "--max-tds", "1500", "--format", "json")
    doc = r.json()
    assert r.rc == ExitCode.PASS and doc["findings"] == [], doc["findings"][:1]
    assert doc["summary"]["tds"] == 1500

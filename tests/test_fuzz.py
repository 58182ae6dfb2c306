"""`kvmtdx fuzz`: findings found, judged by the invariant, shrunk, reported and replayed.

The seeded bugs of the simulated host are the discrepancies to find (each mutant's search
within the default budget is tests/test_fuzz_mutants.py); here, what a run does with what it
finds: the verdicts (a fix is stricter, not a bug), the report, the replay files (a request
that `init-vm` and `predict` replay, its TD's history included; a fuzz case for
KVM_TDX_CAPABILITIES that `fuzz --replay` replays), the seed, the database, an interrupt,
and the one line a missing hypothesis gets.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli

from kvmtdx import layout
from kvmtdx.errors import ExitCode
from kvmtdx.fuzz import Budget, End, FuzzOptions, FuzzReport, run_fuzz
from kvmtdx.fuzz.judge import (
    CapsAnswer,
    Model,
    Observed,
    Verdict,
    difference,
    judge,
)
from kvmtdx.fuzz.minimise import minimise
from kvmtdx.fuzz.replay import FUZZ_CASE_KIND
from kvmtdx.fuzz.scenario import CapsCall, Scenario
from kvmtdx.knowledge import given
from kvmtdx.model import builders, invariant, mirror
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Outcome
from kvmtdx.report.schema import ReportKind
from kvmtdx.session import open_backend
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import CpuidEntry

THIS = __name__
FIX = "2.0:upstream:denylist_checks_row_index"
CLIPPED = "2.0:rfc-v2:allowlist_skips_row_7_1"


def sim_host() -> SimulatedHost:
    """A --backend plug-in: the simulated rfc-v2 kernel, which says nothing of itself."""
    return SimulatedHost(load_profile("2.0"), MAX_HOST, get_policy("rfc-v2"))


def fuzz(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """`kvmtdx fuzz ARGV --format json`, a search keeping no database."""
    search = [] if "--replay" in argv else ["--no-db"]
    r = run_cli(capsys, "fuzz", *search, "--format", "json", *argv)
    return r.rc, (r.json() if r.out else {}), r.err


def _observed(doc: dict[str, Any]) -> tuple[str, str | None, str]:
    return doc["outcome"], doc["errno"], doc["hw_error"]


# ---------------------------------------------------------------------------
# A run: clean, or findings with their replay files.


def test_a_correct_kernel_runs_its_budget_clean(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, _ = fuzz(capsys, "--simulate", "2.0:rfc-v2", "--max-tds", "300", "--seed", "1")
    assert rc == ExitCode.PASS
    assert (doc["kind"], doc["verdict"], doc["findings"]) == ("fuzz", "pass", [])
    s = doc["summary"]
    assert (s["end"], s["tds"]) == ("tds", 300)
    assert s["init_vm_calls"] > 0 and s["caps_calls"] > 0
    assert doc["host_identity"]["simulated"]["policy"] == "rfc-v2"
    assert doc["seed"] == 1 and doc["database"] is None


def test_a_bug_is_found_shrunk_and_replayed_through_init_vm_and_predict(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save = tmp_path / "found"
    rc, doc, _ = fuzz(capsys, "--simulate", CLIPPED, "--seed", "1", "--first",
                      "--save", str(save))
    assert rc == ExitCode.FAIL and doc["verdict"] == "fail"
    findings = [f for f in doc["findings"] if f["failing"]]
    # The hole shows as a bit never reported yet ACCEPTED (or let through to the module);
    # what the module then says of the bit can differ as well, on the same row.
    verdicts = {f["verdict"] for f in findings}
    assert "breaks_invariant" in verdicts and verdicts <= {"breaks_invariant", "differs"}
    for f in findings:
        assert f["reproduced"] is True and f["call"] == "init_vm"
        assert len(f["request"]["cpuid"]) <= 4 and "before" not in f["request"]
        assert f["predicted"]["check"] == "allowlist" and f["predicted"]["leaf"] == 7
        path = save / f["replay"]
        replay = json.loads(path.read_text())
        assert replay["kind"] == "request" and "expected" in replay["about"]
        got = run_cli(capsys, "init-vm", "--simulate", CLIPPED, "--request", str(path))
        assert got.rc == 0 and _observed(got.json()) == _observed(f["observed"])
        want = run_cli(capsys, "predict", "--module", "2.0", "--policy", "rfc-v2",
                       "--request", str(path), "--format", "json")
        assert _observed(want.json()["init_vm"]) == _observed(f["predicted"])


def test_fuzz_replays_its_findings_until_the_kernel_is_fixed(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    save = tmp_path / "found"
    rc, doc, _ = fuzz(capsys, "--simulate", CLIPPED, "--seed", "1", "--first",
                      "--save", str(save))
    files = sorted(str(p) for p in save.iterdir())
    assert rc == ExitCode.FAIL and len(files) == len(doc["findings"])
    replays = [a for p in files for a in ("--replay", p)]
    rc, again, _ = fuzz(capsys, "--simulate", CLIPPED, *replays)
    assert rc == ExitCode.FAIL and again["summary"]["end"] == "replayed"
    assert sorted(f["expected"] for f in again["findings"]) == \
        sorted(f["expected"] for f in doc["findings"])
    assert {f["origin"] for f in again["findings"]} <= set(files)
    rc, fixed, _ = fuzz(capsys, "--simulate", "2.0:rfc-v2", *replays)
    assert rc == ExitCode.PASS and fixed["findings"] == []


def test_the_same_seed_is_the_same_run(capsys: pytest.CaptureFixture[str]) -> None:
    def run() -> list[dict[str, Any]]:
        rc, doc, _ = fuzz(capsys, "--simulate", "2.0:upstream:flags_unchecked", "--seed", "5",
                          "--max-tds", "200")
        assert rc == ExitCode.FAIL
        return [{k: v for k, v in f.items() if k != "found_after_seconds"}
                for f in doc["findings"]]

    first = run()
    assert len(first) >= 2 and first == run()


def test_the_fix_of_the_bypass_is_stricter_not_a_bug(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, _ = fuzz(capsys, "--simulate", FIX, "--seed", "1", "--max-tds", "1500")
    assert rc == ExitCode.PASS and doc["verdict"] == "pass" and doc["findings"]
    assert {f["verdict"] for f in doc["findings"]} == {"stricter"}
    assert not any(f["failing"] for f in doc["findings"])
    assert doc["summary"]["failing"] == 0 and doc["summary"]["stricter"] >= 1
    r = run_cli(capsys, "fuzz", "--no-db", "--simulate", FIX, "--seed", "1", "--max-tds", "1500")
    assert r.rc == 0 and "Stricter than the model" in r.out and "not a failure" in r.out
    rc, doc, _ = fuzz(capsys, "--simulate", FIX, "--seed", "1", "--max-tds", "1500",
                      "--fail-on-stricter")
    assert rc == ExitCode.FAIL and all(f["failing"] for f in doc["findings"])


def test_a_capabilities_finding_is_a_fuzz_case(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    mutant = "2.0:upstream:gpaw_not_forced"
    rc, doc, _ = fuzz(capsys, "--simulate", mutant, "--seed", "1", "--first",
                      "--save", str(tmp_path))
    (f,) = [f for f in doc["findings"] if f["call"] == "capabilities"]
    assert rc == ExitCode.FAIL and f["request"] is None and f["capabilities"]["nent"] >= 0
    assert "entries[" in f["actual"] and " eax " in f["actual"]
    case = json.loads((tmp_path / f["replay"]).read_text())
    assert case["kind"] == FUZZ_CASE_KIND == ReportKind.FUZZ_CASE.value
    assert [next(iter(c)) for c in case["calls"]] == [next(iter(c)) for c in f["calls"]]
    path = str(tmp_path / f["replay"])
    assert fuzz(capsys, "--simulate", mutant, "--replay", path)[0] == ExitCode.FAIL
    assert fuzz(capsys, "--simulate", "2.0:upstream", "--replay", path)[0] == ExitCode.PASS


def test_a_lifecycle_finding_replays_its_tds_history(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    mutant = "2.0:rfc-v2:td_state_set_before_checks"
    rc, doc, _ = fuzz(capsys, "--simulate", mutant, "--seed", "1", "--first",
                      "--save", str(tmp_path))
    f = next(f for f in doc["findings"] if f["failing"])
    assert rc == ExitCode.FAIL and len(f["request"]["before"]) >= 1
    path = str(tmp_path / f["replay"])
    got = run_cli(capsys, "init-vm", "--simulate", mutant, "--request", path)
    assert _observed(got.json()) == _observed(f["observed"])
    assert len(got.json()["before"]) == len(f["request"]["before"])
    fresh = run_cli(capsys, "init-vm", "--simulate", "2.0:rfc-v2", "--request", path)
    assert _observed(fresh.json()) == _observed(f["predicted"])
    text = run_cli(capsys, "init-vm", "--simulate", mutant, "--request", path,
                   "--format", "text").out
    assert "on a TD after 1 earlier INIT_VM call" in text and "  before 1  " in text
    assert "key IDs " in text and "once the TD was closed" in text


def test_a_key_id_kept_after_a_refusal_shows_in_the_replay(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    mutant = "2.0:rfc-v2:key_id_held_after_refusal"
    rc, doc, _ = fuzz(capsys, "--simulate", mutant, "--seed", "1", "--first",
                      "--save", str(tmp_path))
    f = next(f for f in doc["findings"] if f["call"] == "key_ids")
    assert rc == ExitCode.FAIL and f["expected"].startswith("0 key IDs held after call")
    keys = run_cli(capsys, "init-vm", "--simulate", mutant, "--request",
                   str(tmp_path / f["replay"])).json()["key_ids"]
    assert keys["free_after_calls"] == keys["free_before"] - 1
    assert keys["free_after_close"] == keys["free_before"]


def test_the_text_report_names_the_finding_and_its_request(
        capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "fuzz", "--no-db", "--simulate", CLIPPED, "--seed", "1", "--first")
    assert r.rc == ExitCode.FAIL
    assert r.out.startswith("kvmtdx fuzz: FAIL (")
    assert "Discrepancies that break the invariant" in r.out
    assert "0x7.1 EAX[" in r.out and "request:  attributes" in r.out
    assert "--seed 1 repeats the run" in r.out and "replayed: the same" in r.out


# ---------------------------------------------------------------------------
# What a run needs, and what it leaves.


def test_without_hypothesis_fuzz_says_which_extra_in_one_line(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    assert run_cli(capsys, "fuzz", "--help").rc == 0
    r = run_cli(capsys, "fuzz", "--simulate", "2.0")
    assert r.rc == ExitCode.USAGE and r.out == ""
    assert r.err.count("\n") == 1 and "pip install 'kvmtdx[fuzz]'" in r.err
    # Replaying saved findings needs no hypothesis.
    assert run_cli(capsys, "fuzz", "--simulate", "2.0", "--replay", "none.json").rc == 2


def test_the_database_stays_out_of_the_working_directory(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("KVMTDX_CACHE_DIR", str(cache))
    argv = ("fuzz", "--simulate", CLIPPED, "--seed", "1", "--first", "--format", "json")
    first = run_cli(capsys, *argv).json()
    assert list(work.iterdir()) == []
    assert Path(first["database"]).parent == cache / "fuzz"
    assert any(Path(first["database"]).rglob("*"))
    # The next run tries the saved failures first.
    again = run_cli(capsys, *argv).json()
    assert min(f["found_after_tds"] for f in again["findings"]) <= 3
    mine = tmp_path / "db"
    run_cli(capsys, *argv, "--db", str(mine))
    assert any(mine.rglob("*")) and list(work.iterdir()) == []


def test_an_interrupt_keeps_what_was_found() -> None:
    backend = open_backend(simulate=CLIPPED)
    calls = [0]

    def progress(tds: int, init_vm: int, findings: int, seconds: float) -> None:
        calls[0] += 1
        if findings:
            raise KeyboardInterrupt

    record: list[FuzzReport] = []
    with pytest.raises(KeyboardInterrupt):
        run_fuzz(backend, given(backend.simulation), FuzzOptions(Budget(6000, 60.0), 1),
                 progress=progress, record=record)
    (partial,) = record
    assert partial.stats.end is End.INTERRUPTED and partial.findings
    assert partial.status.value == "fail"


def test_fuzz_needs_a_module_profile_to_predict_by(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = fuzz(capsys, "--backend", f"{THIS}:sim_host", "--max-tds", "50")
    assert rc == ExitCode.USAGE and "--module" in err and err.count("\n") == 1
    rc, doc, _ = fuzz(capsys, "--backend", f"{THIS}:sim_host", "--module", "2.0",
                      "--max-tds", "100", "--seed", "2")
    assert rc == ExitCode.PASS and doc["policy"] == "rfc-v2"


@pytest.mark.parametrize(("argv", "says"), [
    (["--max-tds", "0"], "--max-tds"),
    (["--time", "-1"], "--time"),
    (["--seed", "x"], "--seed"),
    (["--db", "d", "--no-db"], "--no-db"),
    (["--replay", "r.json", "--seed", "1"], "--seed has no effect"),
    (["--replay", "r.json", "--max-tds", "5"], "--max-tds has no effect"),
])
def test_bad_options_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str],
                                  says: str) -> None:
    r = run_cli(capsys, "fuzz", "--simulate", "2.0", *argv)
    assert r.rc == ExitCode.USAGE and says in r.err and r.err.count("\n") == 1


# ---------------------------------------------------------------------------
# The judge and the last cut, on their own.

UPSTREAM = Model(load_profile("2.0"), MAX_HOST, get_policy("upstream"),
                 mirror.reported_entries(load_profile("2.0"), MAX_HOST, get_policy("upstream")))
XFAM = mirror.supported_xfam(load_profile("2.0"), MAX_HOST)


def _answer(spec: str, req: Request) -> Observed:
    from kvmtdx.session import init_vm_once

    run = init_vm_once(open_backend(simulate=spec), req)
    return Observed((run.outcome,), (0,), 0)


def test_the_fixed_denylist_judged_by_the_row_is_the_hole_closed() -> None:
    """An unflagged index-0 entry the lookup lands on row 7.1 carries WAITPKG: upstream refuses
    it by the entry's own index; a kernel that judges the row lets the module refuse it."""
    req = builders.base_request(XFAM, [CpuidEntry(7, 0, 1), CpuidEntry(7, 2, 1),
                                       CpuidEntry(7, 0, 0, ecx=1 << 5)])
    j = judge(UPSTREAM, (req,), _answer(FIX, req))
    (d,) = j.departures
    assert d.verdict is Verdict.STRICTER and d.note == invariant.HOLE_CLOSED_NOTE
    assert d.predicted is not None and d.predicted.check == "denylist"
    assert judge(UPSTREAM, (req,), _answer("2.0:upstream", req)).departures == ()


def test_a_refusal_of_what_was_not_reported_is_stricter_an_acceptance_breaks_it() -> None:
    rfc = get_policy("rfc-v2")
    reported = mirror.reported_entries(UPSTREAM.module, MAX_HOST, rfc)
    core = 1 << 30  # CORE_CAPABILITIES, 7.0 EDX: the model reports and accepts it
    hidden = tuple(e.with_reg("edx", e.edx & ~core) if (e.function, e.index) == (7, 0) else e
                   for e in reported)
    req = builders.base_request(XFAM, [CpuidEntry(7, 0, 1, edx=core)])
    kernel = Model(UPSTREAM.module, MAX_HOST, rfc, hidden)  # a kernel that did not report it
    (d,) = judge(kernel, (req,), Observed((Outcome.classify(22, 0),), (0,), 0)).departures
    assert d.verdict is Verdict.STRICTER and d.note == invariant.STRICTER_NOTE
    trap = builders.trap_request(builders.Trap.STEER, builders.base_request(XFAM), reported,
                                 ebx=0, ecx=1 << 5)
    model = Model(UPSTREAM.module, MAX_HOST, rfc, reported)
    (d,) = judge(model, (trap,), Observed((Outcome.classify(0, 0),), (1,), 0)).departures
    assert d.verdict is Verdict.BREAKS_INVARIANT and "WAITPKG never reported" in d.note


def test_key_ids_and_capabilities_are_judged_too() -> None:
    req = builders.base_request(XFAM)
    accepted = Outcome.classify(0, 0)
    (d,) = judge(UPSTREAM, (req,), Observed((accepted,), (1,), 1)).departures
    assert d.call.value == "key_ids" and "once the TD was closed" in d.expected
    call = CapsCall(nent=3)
    untouched = CapsAnswer(7, call.buffer())  # E2BIG, the buffer as the caller left it
    assert judge(UPSTREAM, (call,), Observed((untouched,), (None,), None)).departures == ()
    written = bytearray(call.buffer())
    written[layout.OFFSET_CAPS_NENT] = 28  # the nent word, which E2BIG must leave alone
    (d,) = judge(UPSTREAM, (call,), Observed((CapsAnswer(7, bytes(written)),), (None,),
                                              None)).departures
    assert d.call.value == "capabilities" and "nent (0x1c, not 0x3)" in d.actual


def test_difference_names_the_field() -> None:
    a = CapsCall(nent=2, fill=0xA5).buffer()
    b = bytearray(a)
    b[8] ^= 1  # supported_xfam
    assert difference(a, bytes(b)).startswith("supported_xfam")
    c = bytearray(a)
    c[-1] ^= 1  # the last entry's padding
    assert difference(a, bytes(c)) == "entries[1] padding"


def test_the_last_cut_keeps_only_what_shows_the_group() -> None:
    keep = (CpuidEntry(7, 1, 1, eax=8), CpuidEntry(0x80000008, 0, 1, eax=48 << 16))
    noise = tuple(CpuidEntry(0xD, i, 1, eax=i + 1) for i in range(6))
    req = builders.base_request(XFAM, (*noise[:3], keep[0], *noise[3:]))
    scenario: Scenario = (CapsCall(nent=28), builders.base_request(XFAM), req)

    def shows(s: Scenario) -> bool:
        last = s[-1]
        return isinstance(last, Request) and all(e in last.init_vm.entries for e in keep)

    tries: list[Scenario] = []

    def counted(s: Scenario) -> bool:
        tries.append(s)
        return shows(s)

    best = minimise(scenario, counted, limit=200)
    assert len(best) == 1 and isinstance(best[0], Request)
    assert set(best[0].init_vm.entries) == set(keep)
    assert len(tries) < 60


# ---------------------------------------------------------------------------
# What lies behind an answer: the kernel WARN (the TD's CPUID: tests/test_fuzz_vcpu.py).

RFC = Model(UPSTREAM.module, MAX_HOST, get_policy("rfc-v2"),
            mirror.reported_entries(UPSTREAM.module, MAX_HOST, get_policy("rfc-v2")))
FULL = mirror.full_request(RFC.module, MAX_HOST, RFC.policy)


def _malformed_topology() -> Request:
    """0x1F with its SMT level zero and a core level at sub-leaf 1: the module's status is
    not an operand's, so Linux 7.3 answers -EIO with a WARN."""
    core = (7, 0x70, 1 | 2 << 8, 0)
    entries = tuple(replace(e, eax=core[0], ebx=core[1], ecx=core[2], edx=core[3])
                    if (e.function, e.index) == (0x1F, 1) else
                    replace(e, eax=0, ebx=0, ecx=0, edx=0)
                    if (e.function, e.index) == (0x1F, 0) else e for e in FULL.init_vm.entries)
    return replace(FULL, init_vm=replace(FULL.init_vm, entries=entries))


def test_the_warn_replaced_by_module_rejected_is_stricter() -> None:
    req = _malformed_topology()
    pred = mirror.init_vm_prediction(RFC.module, MAX_HOST, RFC.policy, req, detail=False)
    assert pred.warns and pred.outcome.errno == 5 and pred.status
    fixed = Outcome.classify(22, pred.status)
    (d,) = judge(RFC, (req,), Observed((fixed,), (0,), 0, (0,))).departures
    assert d.verdict is Verdict.STRICTER and d.note == invariant.WARN_FIXED_NOTE
    # The same answer without the WARN is stricter too; a WARN where none is predicted is not.
    (d,) = judge(RFC, (req,), Observed((pred.outcome,), (0,), 0, (0,))).departures
    assert d.verdict is Verdict.STRICTER and d.call.value == "kernel_warn"
    accepted = Outcome.classify(0, 0)
    (d,) = judge(RFC, (FULL,), Observed((accepted,), (1,), 0, (1,))).departures
    assert (d.call.value, d.verdict) == ("kernel_warn", Verdict.DIFFERS)


def test_caches_follow_kvmtdx_cache_dir_else_the_xdg_cache(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """One rule moves every cache: the fuzz databases and the kernel-source builds."""
    from kvmtdx.fuzz import default_database
    from kvmtdx.kernelsrc.build import cache_dir

    monkeypatch.delenv("KVMTDX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_database() == tmp_path / "xdg" / "kvmtdx" / "fuzz"
    monkeypatch.setenv("KVMTDX_CACHE_DIR", str(tmp_path / "mine"))
    assert default_database() == tmp_path / "mine" / "fuzz"
    assert cache_dir() == tmp_path / "mine" / "kernelsrc"

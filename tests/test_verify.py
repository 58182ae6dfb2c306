"""`kvmtdx verify`: no false alarm, the known hole found, every seeded bug caught, every format.

Runs go through cli.main in-process (one subprocess smoke test drives the
kselftest wrapper).  Each simulated run creates about a thousand TDs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from kvmtdx import checks, cli, sim
from kvmtdx.device import Kvm, tdx_status
from kvmtdx.knowledge import given
from kvmtdx.model.infer import module_from_capabilities
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, load_profile
from kvmtdx.report import verify as render
from kvmtdx.session import Backend, simulated_backend

ROOT = Path(__file__).resolve().parent.parent
BYPASS_PREFIX = "adversarial_denylist_bypass_"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli.main(["verify", *argv])
    return rc, capsys.readouterr().out


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    rc, out = run(capsys, *argv, "--format", "json")
    data: dict[str, Any] = json.loads(out)
    return rc, data


def failing(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in data["checks"] if c["status"] == "fail"}


# ---------------------------------------------------------------------------
# A strict KTAP v1 reader (Documentation/dev-tools/ktap.rst), for these tests.

_RESULT = re.compile(
    r"(?P<ok>ok|not ok) (?P<num>[1-9][0-9]*)(?: (?P<desc>[^#]*[^#\s]))?"
    r"(?: # (?P<directive>SKIP|TODO|XFAIL|TIMEOUT|ERROR)(?: (?P<reason>[^\n]*))?)?"
)
_PLAN = re.compile(r"1\.\.(?P<n>0|[1-9][0-9]*)(?: # SKIP(?: (?P<reason>.+))?)?")


class KtapError(AssertionError):
    pass


def parse_ktap(text: str) -> dict[str, Any]:
    """Version line, one plan before any result, results numbered 1..N, count = plan."""
    if not text.endswith("\n"):
        raise KtapError("output does not end with a newline")
    lines = text.split("\n")[:-1]
    if not lines or lines[0] != "KTAP version 1":
        raise KtapError(f"first line is not 'KTAP version 1': {lines[:1]}")
    plan: int | None = None
    plan_skip: str | None = None
    results: list[dict[str, Any]] = []
    for i, line in enumerate(lines[1:], 2):
        if line == "#" or line.startswith("# "):
            continue
        m = _PLAN.fullmatch(line)
        if m:
            if plan is not None:
                raise KtapError(f"line {i}: a second plan")
            if results:
                raise KtapError(f"line {i}: the plan comes after results")
            plan = int(m.group("n"))
            plan_skip = m.group("reason")
            if "# SKIP" in m.group(0) and plan != 0:
                raise KtapError(f"line {i}: a SKIP plan must be 1..0")
            continue
        r = _RESULT.fullmatch(line)
        if r is None:
            raise KtapError(f"line {i}: not KTAP: {line!r}")
        num = int(r.group("num"))
        if num != len(results) + 1:
            raise KtapError(f"line {i}: test {num} out of sequence")
        if r.group("directive") == "SKIP" and r.group("ok") != "ok":
            raise KtapError(f"line {i}: SKIP on a 'not ok' line")
        results.append({"ok": r.group("ok") == "ok", "num": num, "desc": r.group("desc"),
                        "directive": r.group("directive"), "reason": r.group("reason")})
    if plan is None:
        raise KtapError("no plan")
    if len(results) != plan:
        raise KtapError(f"plan says {plan}, {len(results)} results")
    return {"plan": plan, "plan_skip": plan_skip, "results": results}


def test_ktap_reader_refuses_bad_input() -> None:
    good = "KTAP version 1\n1..2\nok 1 a\nnot ok 2 b\n"
    assert parse_ktap(good)["plan"] == 2
    for bad in ("TAP version 13\n1..0\n", "KTAP version 1\nok 1 a\n",
                "KTAP version 1\n1..2\nok 1 a\n", "KTAP version 1\n1..2\nok 1 a\nok 3 b\n",
                "KTAP version 1\n1..1\nnot ok 1 a # SKIP why\n",
                "KTAP version 1\n1..1\nok 1 a\nstray\n", "KTAP version 1\n1..1 # SKIP x\nok 1\n"):
        with pytest.raises(KtapError):
            parse_ktap(bad)


# ---------------------------------------------------------------------------
# No false alarm; the real hole found.


@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_rfc_v2_passes_for_every_bundled_module(capsys: pytest.CaptureFixture[str],
                                                module: str) -> None:
    rc, data = run_json(capsys, "--simulate", f"{module}:rfc-v2")
    assert failing(data) == {}
    assert rc == 0
    assert data["policy"] == "rfc-v2"
    assert data["summary"]["passed"] >= 35
    assert data["summary"]["tds_created"] > 100


@pytest.mark.parametrize("policy", ["upstream", "upstream-6.16"])
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_upstream_fails_only_the_denylist_bypass(capsys: pytest.CaptureFixture[str],
                                                 module: str, policy: str) -> None:
    rc, data = run_json(capsys, "--simulate", f"{module}:{policy}")
    fails = failing(data)
    assert rc == 1
    assert set(fails) == {f"{BYPASS_PREFIX}waitpkg", f"{BYPASS_PREFIX}hle_rtm",
                          f"{BYPASS_PREFIX}stray_balance"}
    waitpkg = fails[f"{BYPASS_PREFIX}waitpkg"]
    assert waitpkg["actual"].startswith("ACCEPTED")
    assert [b["name"] for b in waitpkg["bits"]] == ["WAITPKG"]
    assert {b["name"] for b in fails[f"{BYPASS_PREFIX}hle_rtm"]["bits"]} == {"HLE", "RTM"}
    assert data["policy"] == policy and "auto" in data["policy_reason"]


# ---------------------------------------------------------------------------
# Every seeded kernel bug is caught.


def mutant_policy(name: str) -> str:
    """The policy a mutant changes, from its description's bracket; [all] runs under rfc-v2."""
    m = re.match(r"\[([^\]]+)\]", sim.MUTANTS[name])
    tags = [t.strip() for t in m.group(1).split(",")] if m else ["all"]
    return "rfc-v2" if "rfc-v2" in tags or "all" in tags else tags[0]


_BASELINE: dict[str, set[str]] = {}


def baseline_failures(policy: str) -> set[str]:
    if policy not in _BASELINE:
        m, p = load_profile("2.0"), get_policy(policy)
        b = simulated_backend(m, MAX_HOST, p)
        r = checks.run_verify(b.seam, backend_label="sim", given=given(b, policy=policy))
        _BASELINE[policy] = {c.id for c in r.checks if c.status == "fail"}
    return _BASELINE[policy]


@pytest.mark.parametrize("mutant", sorted(sim.MUTANTS))
def test_every_mutant_is_caught(capsys: pytest.CaptureFixture[str], mutant: str) -> None:
    policy = mutant_policy(mutant)
    rc, data = run_json(capsys, "--simulate", f"2.0:{policy}:{mutant}", "--policy", policy)
    assert rc == 1
    new = {k: v for k, v in failing(data).items() if k not in baseline_failures(policy)}
    assert new, f"mutant {mutant} ({policy}) fails nothing the clean kernel passes"
    for c in new.values():
        # Each failure names its rule (the id) and says what differed, by bit where one is.
        assert c["detail"]
        assert c["bits"] or (c["expected"] != c["actual"])


def test_the_mutant_list_is_what_the_test_enumerates() -> None:
    # Collection enumerates sim.MUTANTS, so a new mutant runs without touching this file;
    # this pins that each has a policy the suite knows.
    for name in sim.MUTANTS:
        assert mutant_policy(name) in ("upstream", "upstream-6.16", "rfc-v2"), name


# ---------------------------------------------------------------------------
# Real device without TDX: exit 4 with the reason, in every format.


def _no_tdx_here() -> str | None:
    st = tdx_status()
    if st.available:
        return "this host offers TDX"
    if not st.skip:
        return f"the real device is not a clean skip here: {st.reason}"
    return None


@pytest.mark.realkvm
@pytest.mark.parametrize("fmt", ["text", "ktap", "json", "junit"])
def test_real_device_without_tdx_skips_in_every_format(capsys: pytest.CaptureFixture[str],
                                                       fmt: str) -> None:
    why = _no_tdx_here()
    if why:
        pytest.skip(why)
    rc, out = run(capsys, "--format", fmt)
    assert rc == 4
    if fmt == "text":
        assert out.startswith("kvmtdx verify: SKIP: ")
        assert len(out.splitlines()[0]) > 30 and "--simulate" in out.splitlines()[0]
    elif fmt == "ktap":
        k = parse_ktap(out)
        assert k["plan"] == 0 and k["plan_skip"] and "--simulate" in k["plan_skip"]
    elif fmt == "json":
        data = json.loads(out)
        assert data["schema"] == 1 and data["summary"]["verdict"] == "skip"
        assert "--simulate" in data["skip"]["reason"]
    else:
        root = ET.fromstring(out)
        skipped = root.findall(".//testcase/skipped")
        assert len(skipped) == 1 and "--simulate" in skipped[0].get("message", "")


# ---------------------------------------------------------------------------
# Formats.


@pytest.fixture(scope="module")
def upstream_report() -> checks.VerifyReport:
    m, p = load_profile("1.5.01"), get_policy("upstream")
    b = simulated_backend(m, MAX_HOST, p)
    return checks.run_verify(b.seam, backend_label="sim", given=given(b, policy="auto"))


def test_ktap_parses_strictly(upstream_report: checks.VerifyReport) -> None:
    k = parse_ktap(render.render_ktap(upstream_report))
    assert k["plan"] == len(upstream_report.checks)
    by_id = {r["desc"]: r for r in k["results"]}
    assert not by_id[f"{BYPASS_PREFIX}waitpkg"]["ok"]
    assert by_id["caps_flags_rejected"]["ok"] and by_id["caps_flags_rejected"]["directive"] is None
    skips = [r for r in k["results"] if r["directive"] == "SKIP"]
    assert skips and all(r["ok"] and r["reason"] for r in skips)
    assert render.exit_code(upstream_report) == 1


def test_json_schema(upstream_report: checks.VerifyReport) -> None:
    data = json.loads(render.render_json(upstream_report))
    for key in ("schema", "kvmtdx", "verdict", "backend", "policy", "policy_reason", "module",
                "allowlist", "summary", "checks"):
        assert key in data, key
    assert data["schema"] == 1 and data["verdict"] == "fail"
    for key in ("verdict", "total", "passed", "failed", "skipped", "tds_created", "ioctls"):
        assert key in data["summary"], key
    for c in data["checks"]:
        assert set(c) == {"id", "group", "status", "detail", "expected", "actual", "bits"}
        assert c["status"] in ("pass", "fail", "skip")
        assert re.fullmatch(r"[a-z0-9_]+", c["id"]) and c["group"] in checks.GROUPS
        assert "\n" not in c["detail"]
        for b in c["bits"]:
            assert set(b) == {"leaf", "subleaf", "register", "bit", "name"}
    ids = [c["id"] for c in data["checks"]]
    assert len(ids) == len(set(ids))


def test_junit_parses(upstream_report: checks.VerifyReport) -> None:
    root = ET.fromstring(render.render_junit(upstream_report))
    assert root.tag == "testsuites"
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == upstream_report.summary.total
    assert len(root.findall(".//failure")) == upstream_report.summary.failed
    assert len(root.findall(".//skipped")) == upstream_report.summary.skipped
    assert {s.get("name") for s in root.findall("testsuite")} <= {
        f"kvmtdx.verify.{g}" for g in checks.GROUPS}


def test_text_summary_then_failures(upstream_report: checks.VerifyReport) -> None:
    text = render.render_text(upstream_report)
    head = text.splitlines()
    assert head[0].startswith("kvmtdx verify: FAIL (")
    assert any(line.strip().startswith("policy") and "upstream" in line for line in head[:8])
    assert any("TDs created" in line and "ioctls" in line for line in head[:8])
    assert f"FAIL {BYPASS_PREFIX}waitpkg" in text and "WAITPKG" in text


def test_output_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "report.xml"
    rc, out = run(capsys, "--simulate", "1.5.01:rfc-v2", "--format", "junit",
                  "--output", str(target))
    assert rc == 0 and out == ""
    assert ET.parse(target).getroot().get("failures") == "0"


def test_kselftest_wrapper_smoke() -> None:
    env = dict(os.environ, KVMTDX=f"{sys.executable} -m kvmtdx",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([str(ROOT / "scripts" / "kselftest-verify"), "--simulate",
                           "1.5.01:upstream"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    k = parse_ktap(proc.stdout)
    assert any(not r["ok"] and r["desc"] == f"{BYPASS_PREFIX}waitpkg" for r in k["results"])


# ---------------------------------------------------------------------------
# Knowledge modes.


@pytest.mark.parametrize("policy", ["rfc-v2", "upstream"])
def test_without_a_module_only_the_invariant_runs(policy: str) -> None:
    m = load_profile("2.0")
    plugin = Backend(sim.SimulatedHost(m, MAX_HOST, get_policy(policy)), "plug-in", False)
    r = checks.run_verify(plugin.seam, backend_label="plug-in", given=given(plugin),
                          kernel_release="7.3.0")
    status = {c.id: c for c in r.checks}
    assert status["caps_entries_match_prediction"].status == "skip"
    assert "--module" in status["caps_entries_match_prediction"].detail
    assert status["init_vm_unreported_bits_refused"].status == "pass"
    assert status["init_vm_all_reported_accepted"].status == "pass"
    fails = {c.id for c in r.failures()}
    assert fails == (set() if policy == "rfc-v2" else
                     {f"{BYPASS_PREFIX}waitpkg", f"{BYPASS_PREFIX}hle_rtm",
                      f"{BYPASS_PREFIX}stray_balance"})
    assert r.knowledge is not None and "kernel release 7.3.0" in r.knowledge.policy_reason


def test_module_without_host_infers_it() -> None:
    m = load_profile("2.0")
    plugin = Backend(sim.SimulatedHost(m, MAX_HOST, get_policy("rfc-v2")), "plug-in", False)
    r = checks.run_verify(plugin.seam, backend_label="plug-in",
                          given=given(plugin, module="2.0", policy="auto"))
    assert r.failures() == ()
    assert r.knowledge is not None and r.knowledge.policy is not None
    assert r.knowledge.policy.name == "rfc-v2" and not r.knowledge.host_exact


def test_unknown_release_without_module_skips_policy_rules() -> None:
    m = load_profile("1.5.01")
    r = checks.run_verify(sim.SimulatedHost(m, MAX_HOST, get_policy("rfc-v2")),
                          backend_label="plug-in", kernel_release="5.10.0")
    assert r.knowledge is not None and r.knowledge.policy is None
    assert "give --policy" in r.knowledge.policy_reason
    assert {c.id: c.status for c in r.checks}["policy_allowlist_filter"] == "skip"
    assert r.failures() == ()


def test_save_module_then_verify_the_patched_kernel(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    saved = tmp_path / "host-module.json"
    assert cli.main(["caps", "--simulate", "2.0:upstream", "--policy", "upstream",
                     "--save-module", str(saved)]) == 0
    capsys.readouterr()
    profile = load_profile(str(saved))
    i = profile.row_index(7, 0)
    assert i is not None and profile.unknown_mask(i)[2] & 1 << 5  # WAITPKG: hidden, unknown
    rc, data = run_json(capsys, "--simulate", "2.0:rfc-v2", "--module", str(saved),
                        "--policy", "rfc-v2")
    assert rc == 0, failing(data)
    assert data["module_source"].startswith(f"--module {saved}")


def test_save_module_needs_a_policy(capsys: pytest.CaptureFixture[str],
                                    tmp_path: Path) -> None:
    assert cli.main(["caps", "--simulate", "2.0", "--save-module",
                     str(tmp_path / "m.json")]) == 2
    assert "--policy" in capsys.readouterr().err


def test_save_module_with_a_base_restores_the_table() -> None:
    m = load_profile("2.0")
    with Kvm(sim.SimulatedHost(m, MAX_HOST, get_policy("upstream"))) as kvm:
        td = kvm.create_td()
        with td:
            caps = td.capabilities()
    inferred = module_from_capabilities(caps, get_policy("upstream"), base=m)
    assert inferred.rows == m.rows and inferred.unknown == ()


def test_progress_and_hygiene(no_fd_leak: object) -> None:
    seen: list[tuple[int, int, int]] = []
    m = load_profile("1.5.01")
    b = simulated_backend(m, MAX_HOST, get_policy("rfc-v2"))
    seam = b.seam
    assert isinstance(seam, sim.SimulatedHost)
    r = checks.run_verify(seam, backend_label="sim", given=given(b),
                          progress=lambda d, t, n: seen.append((d, t, n)))
    assert seen[-1][0] == seen[-1][1] == r.summary.total
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    assert seen[-1][2] == r.summary.tds_created > 500
    assert seam.live_tds == 0 and seam.free_key_ids == seam.key_ids
    assert r.summary.ioctls > r.summary.tds_created

"""`kvmtdx verify` reports: text, KTAP v1, JSON, JUnit XML, and the skip in every format.

Golden files: tests/golden/verify-2.0-upstream.ktap (and .xml, and the same for
2.0-rfc-v2) are the exact output of `kvmtdx verify --simulate 2.0:upstream
--format ktap` (junit).  After an intended change to the output, rewrite them with

    KVMTDX_REGEN_GOLDEN=1 scripts/test tests/test_verify_formats.py

and review their diff before committing.  The JUnit files have the hygiene check's
fd and RSS figures (this process's, not the run's) and each check's time written as N.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import KtapError, assert_golden, parse_ktap, run_cli

from kvmtdx import checks
from kvmtdx.device import tdx_status
from kvmtdx.identity import identify
from kvmtdx.knowledge import given
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.report import verify as render
from kvmtdx.report.schema import ENVELOPE
from kvmtdx.session import simulated_backend
from kvmtdx.verdict import Status

ROOT = Path(__file__).resolve().parent.parent
BYPASS_PREFIX = "adversarial_denylist_bypass_"


def test_the_ktap_reader_refuses_what_ktap_v1_forbids() -> None:
    good = "KTAP version 1\n1..2\nok 1 a\nnot ok 2 b\n"
    assert parse_ktap(good)["plan"] == 2
    for bad in ("TAP version 13\n1..0\n", "KTAP version 1\nok 1 a\n",
                "KTAP version 1\n1..2\nok 1 a\n", "KTAP version 1\n1..2\nok 1 a\nok 3 b\n",
                "KTAP version 1\n1..1\nnot ok 1 a # SKIP why\n",
                "KTAP version 1\n1..1\nok 1 a\nstray\n", "KTAP version 1\n1..1 # SKIP x\nok 1\n",
                "KTAP version 1\n1..1\n1..1\nok 1 a\n", "KTAP version 1\n1..0"):
        with pytest.raises(KtapError):
            parse_ktap(bad)


# ---------------------------------------------------------------------------
# Golden output of the simulated kernels with and without the series.

# Both fail: 7.3, with or without the series, WARNs on a malformed leaf 0x1F.
GOLDEN_RUNS = [("2.0:upstream", 1), ("2.0:rfc-v2", 1)]
# The one figure that is this process's, not the run's: the hygiene check's fd and RSS
# numbers (JUnit keeps a passing check's detail).  Everything else is compared as printed.
_PROCESS_FIGURES = re.compile(r"\d+ fds as before; RSS \d+ MiB -&gt; \d+ MiB")


_TIMES = re.compile(r' time="\d+\.\d{3}"')


def _stable(junit: str) -> str:
    """The run's own figures as N: the process's fds and RSS, and each check's time."""
    junit = _TIMES.sub(' time="N"', junit)
    return _PROCESS_FIGURES.sub("N fds as before; RSS N MiB -&gt; N MiB", junit)


@pytest.mark.parametrize(("spec", "rc"), GOLDEN_RUNS)
@pytest.mark.parametrize(("fmt", "ext"), [("ktap", "ktap"), ("junit", "xml")])
def test_verify_output_is_the_golden_file(capsys: pytest.CaptureFixture[str], spec: str,
                                          rc: int, fmt: str, ext: str) -> None:
    r = run_cli(capsys, "verify", "--simulate", spec, "--format", fmt)
    assert (r.rc, r.err) == (rc, "")
    if fmt == "ktap":
        parse_ktap(r.out)
        text = r.out
    else:
        ET.fromstring(r.out)
        assert _PROCESS_FIGURES.search(r.out)
        text = _stable(r.out)
    assert_golden(f"verify-{spec.replace(':', '-')}.{ext}", text)


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
    rc, out, _ = run_cli(capsys, "verify", "--format", fmt)
    assert rc == 4
    if fmt == "text":
        assert out.startswith("kvmtdx verify: SKIP: ")
        assert len(out.splitlines()[0]) > 30 and "--simulate" in out.splitlines()[0]
    elif fmt == "ktap":
        k = parse_ktap(out)
        assert k["plan"] == 0 and k["plan_skip"] and "--simulate" in k["plan_skip"]
    elif fmt == "json":
        data = json.loads(out)
        assert (data["schema"], data["kind"]) == (1, "verify")
        assert data["summary"]["verdict"] == "skip" and "--simulate" in data["skip"]["reason"]
    else:
        root = ET.fromstring(out)
        skipped = root.findall(".//testcase/skipped")
        assert len(skipped) == 1 and "--simulate" in skipped[0].get("message", "")


# ---------------------------------------------------------------------------
# One failing run (module 1.5.01, today's kernel) in every format.


@pytest.fixture(scope="module")
def upstream_report() -> checks.VerifyReport:
    m, p = load_profile("1.5.01"), get_policy("upstream")
    b = simulated_backend(m, MAX_HOST, p)
    return checks.run_verify(b.seam, backend_label="sim",
                             given=given(b.simulation, policy="auto"))


def test_ktap_marks_the_bypass_not_ok_and_skips_with_a_reason(
        upstream_report: checks.VerifyReport) -> None:
    k = parse_ktap(render.render_ktap(upstream_report))
    assert k["plan"] == len(upstream_report.checks)
    by_id = {r["desc"]: r for r in k["results"]}
    assert not by_id[f"{BYPASS_PREFIX}waitpkg"]["ok"]
    assert by_id["caps_flags_rejected"]["ok"] and by_id["caps_flags_rejected"]["directive"] is None
    skips = [r for r in k["results"] if r["directive"] == "SKIP"]
    assert skips and all(r["ok"] and r["reason"] for r in skips)
    assert render.exit_code(upstream_report) == 1


def test_json_has_the_envelope_then_the_documented_schema_1_fields(
        upstream_report: checks.VerifyReport) -> None:
    backend = simulated_backend(load_profile("1.5.01"), MAX_HOST, get_policy("upstream"))
    data = json.loads(render.render_json(upstream_report,
                                         identify(backend, upstream_report.knowledge)))
    assert list(data)[:5] == [*ENVELOPE, "host_identity", "kvmtdx"]
    assert (data["schema"], data["kind"]) == (1, "verify")
    assert data["tool_version"] == data["kvmtdx"]
    for key in ("verdict", "backend", "policy", "policy_reason", "module", "allowlist",
                "summary", "checks"):
        assert key in data, key
    assert data["verdict"] == "fail"
    for key in ("verdict", "total", "passed", "failed", "skipped", "info", "tds_created",
                "ioctls"):
        assert key in data["summary"], key
    for c in data["checks"]:
        assert set(c) == {"id", "group", "status", "detail", "expected", "actual", "bits",
                          "request", "seconds"}
        assert isinstance(c["seconds"], float) and c["seconds"] >= 0
        assert c["status"] in ("pass", "fail", "skip", "info")
        assert re.fullmatch(r"[a-z0-9_]+", c["id"]) and c["group"] in checks.GROUPS
        assert "\n" not in c["detail"]
        for b in c["bits"]:
            assert set(b) == {"leaf", "subleaf", "register", "bit", "name"}
    ids = [c["id"] for c in data["checks"]]
    assert len(ids) == len(set(ids))


def test_junit_counts_cases_failures_and_skips_per_group(
        upstream_report: checks.VerifyReport) -> None:
    root = ET.fromstring(render.render_junit(upstream_report))
    assert root.tag == "testsuites"
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == upstream_report.summary.total
    assert len(root.findall(".//failure")) == upstream_report.summary.failed
    assert len(root.findall(".//skipped")) == upstream_report.summary.skipped
    assert {s.get("name") for s in root.findall("testsuite")} <= {
        f"kvmtdx.verify.{g}" for g in checks.GROUPS}


def test_text_gives_the_summary_then_each_failure(upstream_report: checks.VerifyReport) -> None:
    text = render.render_text(upstream_report)
    head = text.splitlines()
    assert head[0].startswith("kvmtdx verify: FAIL (")
    assert any(line.strip().startswith("policy") and "upstream" in line for line in head[:8])
    assert any("TDs created" in line and "ioctls" in line for line in head[:8])
    assert f"FAIL {BYPASS_PREFIX}waitpkg" in text and "WAITPKG" in text


def test_output_file_gets_the_report_and_stdout_stays_empty(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "report.xml"
    rc, out, _ = run_cli(capsys, "verify", "--simulate", "1.5.01:rfc-v2", "--format", "junit",
                         "--output", str(target))
    assert rc == 0 and out == ""
    assert ET.parse(target).getroot().get("failures") == "0"


def test_kselftest_wrapper_passes_ktap_and_the_exit_code_through() -> None:
    env = dict(os.environ, KVMTDX=f"{sys.executable} -m kvmtdx",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([str(ROOT / "scripts" / "kselftest-verify"), "--simulate",
                           "1.5.01:upstream"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    k = parse_ktap(proc.stdout)
    assert any(not r["ok"] and r["desc"] == f"{BYPASS_PREFIX}waitpkg" for r in k["results"])


def test_kselftest_wrapper_skips_when_kvmtdx_is_not_installed(tmp_path: Path) -> None:
    # A python3 that cannot import kvmtdx (no site-packages), and no kvmtdx on PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python3.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([str(ROOT / "scripts" / "kselftest-verify"), "--simulate", "2.0"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
                          check=False)
    assert proc.returncode == 4, proc.stderr
    k = parse_ktap(proc.stdout)
    assert k["plan"] == 0 and "kvmtdx is not installed" in str(k["plan_skip"])


def test_groups_line_counts_failures_and_skips_apart(
        upstream_report: checks.VerifyReport) -> None:
    """`adversarial 0/6` for six skips would read as six failures: skips are named."""
    line = next(x for x in render.render_text(upstream_report).splitlines()
                if x.strip().startswith("groups"))
    assert "policy 2/5 (3 skipped)," in line
    assert "adversarial 4/8 (3 FAILED, 1 skipped)," in line
    assert "capabilities 9/9," in line
    mixed = [checks.CheckResult(f"c{i}", "adversarial", s, "x")
             for i, s in enumerate([Status.PASS, Status.FAIL, Status.SKIP, Status.SKIP])]
    both = replace(upstream_report, checks=tuple(mixed))
    assert "adversarial 1/4 (1 FAILED, 2 skipped)" in render.render_text(both)


# ---------------------------------------------------------------------------
# An informational result (set_cpuid2_consistency): recorded, never a failure.

INFO_ID = "set_cpuid2_consistency"


def test_info_is_an_ok_with_its_detail_as_a_diagnostic(
        upstream_report: checks.VerifyReport) -> None:
    text = render.render_ktap(upstream_report)
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.endswith(f" {INFO_ID}"))
    assert lines[i].startswith("ok ") and "# SKIP" not in lines[i]
    assert lines[i - 1].startswith(f"# {INFO_ID}: KVM_SET_CPUID2 accepted 3 of 3")
    k = parse_ktap(text)
    assert next(r for r in k["results"] if r["desc"] == INFO_ID)["ok"]
    s = upstream_report.summary
    assert s.info == 1 and f"pass:{s.passed + s.info} " in lines[-1]


def test_info_in_junit_is_a_passing_case_with_its_output(
        upstream_report: checks.VerifyReport) -> None:
    root = ET.fromstring(render.render_junit(upstream_report))
    case = next(c for c in root.iter("testcase") if c.get("name") == INFO_ID)
    assert case.find("failure") is None and case.find("skipped") is None
    out = case.find("system-out")
    assert out is not None and out.text is not None and "unvalidated" in out.text
    assert root.get("failures") == str(upstream_report.summary.failed)


def test_info_in_text_has_its_own_section(upstream_report: checks.VerifyReport) -> None:
    out = render.render_text(upstream_report)
    assert "1 informational of" in out.splitlines()[0]
    section = out.split("Informational (recorded, judged by no rule):\n", 1)[1]
    assert section.startswith(f"  {INFO_ID}: KVM_SET_CPUID2 accepted")
    assert "effective 5/6 (1 FAILED, 1 informational)" in out


def test_info_counts_as_a_pass_for_every_verdict() -> None:
    from kvmtdx.errors import ExitCode
    from kvmtdx.verdict import Status, exit_code, overall

    assert overall([Status.INFO]) is Status.PASS
    assert overall([Status.INFO, Status.SKIP]) is Status.PASS
    assert overall([Status.INFO, Status.FAIL]) is Status.FAIL
    assert overall([Status.SKIP]) is Status.SKIP
    assert exit_code(Status.INFO) is ExitCode.PASS

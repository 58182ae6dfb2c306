"""The tmt metadata: `tmt lint` is clean, and the simulated plan runs through tmt here.

A lab runs kvmtdx from its orchestration engine (Testing Farm, Beaker through
tmt); these tests hold the fmf tree (.fmf/, tmt/) to what tmt accepts and run
/tmt/plans/simulated with local provisioning: probe passes and verify fails exactly
init_vm_no_kernel_warn on the simulated rfc-v2 kernel (module 2.0: the series keeps 7.3's
WARN on a malformed leaf 0x1F), with their KTAP, JUnit and JSON kept, fuzz runs a
bounded search clean (a skip that says why where kvmtdx has no fuzz command), and the
report test merges the
plan's runs into one page.  tmt comes with the test extra; its local
provisioning needs rsync (Debian's; scripts/test installs it in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import WARN_CHECK, find_all, parse_page

from kvmtdx.checks import CHECKS

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PLAN = "/tmt/plans/simulated"
TESTS = ("/tmt/tests/verify", "/tmt/tests/probe", "/tmt/tests/fuzz", "/tmt/tests/report")


def _need(tool: str, why: str) -> str:
    found = shutil.which(tool, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        reason = f"{tool} is not installed ({why})"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _env() -> dict[str, str]:
    """This venv's kvmtdx first on PATH, for tmt and the tests it runs."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_tmt_lint_is_clean() -> None:
    tmt = _need("tmt", "pip install tmt: the test extra has it")
    res = subprocess.run([tmt, "lint"], cwd=ROOT, capture_output=True, text=True, env=_env(),
                         timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    verdicts = [line.split()[0] for line in res.stdout.splitlines() if line[:4] in
                ("pass", "fail", "warn", "skip")]
    assert verdicts and set(verdicts) <= {"pass", "skip"}, res.stdout
    linted = set(res.stdout.splitlines())
    for name in (*TESTS, PLAN, "/tmt/plans/tdx-host"):
        assert name in linted, name


@pytest.fixture(scope="module")
def tmt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of the simulated plan through tmt with local provisioning; its workdir."""
    tmt = _need("tmt", "pip install tmt: the test extra has it")
    _need("rsync", "tmt's local provisioning copies the tree with it: apt-get install rsync")
    work = tmp_path_factory.mktemp("tmt") / "run"
    env = _env()
    # Requirements (the kvmtdx package, hypothesis) are this venv's: prepare, which would
    # install them with the system's package manager, is skipped.  fuzz is held to a
    # budget of seconds here, its database kept out of the home directory (tmt splits -e
    # values as a shell would: the quotes keep the options one value).
    argv = [tmt, "--feeling-safe", "run", "--id", str(work), "-e", f"PATH={env['PATH']}",
            "-e", "KVMTDX_FUZZ_SECONDS=20", "-e", "KVMTDX_FUZZ_ARGS='--max-tds 1500 --no-db'",
            "--all", "--skip", "prepare",
            "provision", "--how", "local",
            "report", "--how", "junit", "--file", str(work.parent / "tmt-junit.xml"),
            "plan", "--name", f"^{PLAN}$"]
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=600, check=False)
    # tmt exits 1 when a test fails: verify does, on the WARN (see the tests below).
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    return work


def _data(run: Path, test: str) -> Path:
    (found,) = (run / PLAN.lstrip("/") / "execute" / "data").glob(
        f"guest/*/{test.lstrip('/')}-*/data")
    return found


def test_the_simulated_plan_runs_through_tmt(tmt_run: Path) -> None:
    root = ET.parse(tmt_run.parent / "tmt-junit.xml").getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == set(TESTS)
    for name in ("/tmt/tests/verify", "/tmt/tests/probe", "/tmt/tests/report"):
        case = cases[name]
        assert case.find("error") is None and case.find("skipped") is None, name
        failed = case.find("failure") is not None
        assert failed == (name == "/tmt/tests/verify"), name
    fuzz = cases["/tmt/tests/fuzz"]
    has_fuzz = subprocess.run([str(BIN / "kvmtdx"), "fuzz", "--help"], capture_output=True,
                              check=False).returncode == 0
    if has_fuzz:  # the simulated rfc-v2 kernel runs its budget clean
        assert fuzz.find("error") is None and fuzz.find("failure") is None
        assert fuzz.find("skipped") is None
    else:
        assert fuzz.find("skipped") is not None
        assert "no fuzz command" in (_data(tmt_run, "/tmt/tests/fuzz") / "results.yaml").read_text()


def test_verify_keeps_ktap_junit_and_json_of_one_run(tmt_run: Path) -> None:
    data = _data(tmt_run, "/tmt/tests/verify")
    ktap = (data / "verify.ktap").read_text()
    assert ktap.startswith("KTAP version 1\n") and f"\n1..{len(CHECKS)}\n" in ktap
    doc = json.loads((data / "verify.json").read_text())
    assert doc["kind"] == "verify" and doc["verdict"] == "fail"
    assert [c["id"] for c in doc["checks"] if c["status"] == "fail"] == [WARN_CHECK]
    assert doc["host_identity"]["simulated"]["policy"] == "rfc-v2"
    junit = ET.parse(data / "verify.junit.xml").getroot()
    assert junit.get("tests") == str(len(CHECKS)) and junit.get("failures") == "1"
    assert [line.split()[-1] for line in ktap.splitlines() if line.startswith("not ok")] == [
        WARN_CHECK]
    passed = [line for line in ktap.splitlines() if line.startswith("ok ")]
    assert len(passed) == doc["summary"]["passed"] + doc["summary"]["skipped"]
    results = (data / "results.yaml").read_text()
    for artifact in ("verify.ktap", "verify.junit.xml", "verify.json"):
        assert f"- {artifact}\n" in results


def test_the_report_test_merges_the_plans_runs_into_a_page(tmt_run: Path) -> None:
    data = _data(tmt_run, "/tmt/tests/report")
    root = parse_page((data / "kvmtdx-report.html").read_text())
    assert len(find_all(root, "table", "matrix")) == 1  # the verify run
    assert len(find_all(root, "table", "bitmaps")) == 1  # the probe run
    assert (data / "kvmtdx-report.md").read_text().startswith("# kvmtdx: 2 runs")
    assert ET.parse(data / "kvmtdx-report.junit.xml").getroot().get("failures") == "1"
    assert json.loads((_data(tmt_run, "/tmt/tests/probe") / "allowlist.json").read_text())[
        "kind"] == "allowlist"


# ---------------------------------------------------------------------------
# tmt/tests/kvmtdx-test on its own: exit codes become tmt results.

SCRIPT = ROOT / "tmt" / "tests" / "kvmtdx-test"


def _script(tmp: Path, *argv: str, simulate: str | None = None) -> str:
    """Run the test script as tmt would; the results.yaml it leaves for tmt."""
    env = _env()
    env.pop("KVMTDX_SIMULATE", None)
    if simulate:
        env["KVMTDX_SIMULATE"] = simulate
    data = tmp / "data"
    env.update(TMT_TEST_DATA=str(data), TMT_PLAN_DATA=str(tmp / "plan"))
    res = subprocess.run(["bash", str(SCRIPT), *argv], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr  # the outcome is in results.yaml, not the exit code
    return (data / "results.yaml").read_text()


def test_a_failing_kernel_is_a_tmt_failure_with_its_reports(tmp_path: Path) -> None:
    results = _script(tmp_path, "verify", simulate="2.0:upstream")
    assert "  result: fail\n" in results
    assert "- verify.ktap\n" in results and "- verify.json\n" in results
    assert (tmp_path / "plan" / "kvmtdx" / "verify-simulated-2.0-upstream.json").is_file()


def test_no_tdx_here_is_a_tmt_skip_with_the_reason(tmp_path: Path) -> None:
    info = subprocess.run([str(BIN / "kvmtdx"), "info"], capture_output=True, check=False)
    if info.returncode != 4:
        pytest.skip("kvmtdx info does not say 'no TDX here' (exit 4) on this host")
    results = _script(tmp_path, "verify")
    assert "  result: skip\n" in results
    assert "--simulate" in results  # the reason's hint, as kvmtdx prints it


def test_nothing_to_merge_and_an_unknown_command(tmp_path: Path) -> None:
    assert "  result: skip\n" in _script(tmp_path / "a", "report")
    results = _script(tmp_path / "b", "bogus")
    assert "  result: error\n" in results and "unknown command" in results

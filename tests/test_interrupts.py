"""Interrupted runs: SIGINT exits 130 and SIGTERM 143 (as a shell reports a signal death),
with one line and no traceback, whenever the signal comes (start-up included), every
handle closed on the way out, and a KTAP run ends with `Bail out!` so the runner
records it rather than a truncated file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import parse_ktap, run_cli

from kvmtdx import cli
from kvmtdx.checks import CHECKS

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _kvmtdx(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Python `code` (which starts kvmtdx) in a child with tests/ importable, ARGV as its
    command line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          check=False, env=env, timeout=300)


MAIN = "import runpy, sys; sys.argv[0] = 'kvmtdx'; runpy.run_module('kvmtdx', run_name='__main__')"


def test_sigint_while_the_command_line_is_parsed(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert run_cli(capsys, "info") == (130, "", "kvmtdx: interrupted\n")


# Start-up: SIGINT while kvmtdx's own modules load, before main() can catch anything.
INTERRUPT_ON_IMPORT = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "kvmtdx.cli.common":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
"""


def test_sigint_while_python_m_kvmtdx_starts_up() -> None:
    res = _kvmtdx(INTERRUPT_ON_IMPORT + MAIN, "info", "--simulate", "2.0")
    assert (res.returncode, res.stdout, res.stderr) == (130, "", "kvmtdx: interrupted\n")


def test_sigint_while_the_kvmtdx_script_starts_up() -> None:
    # What the installed `kvmtdx` script runs: the entry point pyproject.toml names.
    script = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines()
                  if line.startswith("kvmtdx = "))
    module, _, func = script.split('"')[1].partition(":")
    res = _kvmtdx(INTERRUPT_ON_IMPORT + f"import sys; sys.argv[0] = 'kvmtdx'\n"
                  f"from {module} import {func}; sys.exit({func}())", "info", "--simulate", "2.0")
    assert (res.returncode, res.stdout, res.stderr) == (130, "", "kvmtdx: interrupted\n")


@pytest.mark.parametrize(("factory", "rc", "line"), [
    ("sigint_midway", 130, "kvmtdx: interrupted"),
    ("sigterm_midway", 143, "kvmtdx: terminated"),
])
def test_a_signal_midway_exits_with_its_code_and_closes_every_handle(
        factory: str, rc: int, line: str) -> None:
    res = _kvmtdx(MAIN, "verify", "--backend", f"helpers:{factory}")
    assert res.returncode == rc, res.stderr
    assert res.stderr.splitlines() == [line, "simulated fds open at exit: 0"]


@pytest.mark.parametrize(("factory", "rc", "why"), [
    ("sigint_midway", 130, "interrupted"),
    ("sigterm_midway", 143, "terminated"),
])
def test_an_interrupted_ktap_run_ends_with_bail_out(factory: str, rc: int, why: str) -> None:
    res = _kvmtdx(MAIN, "verify", "--format", "ktap", "--backend", f"helpers:{factory}")
    assert res.returncode == rc, res.stderr
    k = parse_ktap(res.stdout)
    assert k["bail_out"] == f"{why} after {len(k['results'])} of {k['plan']} checks"
    ids = [c.id for c in CHECKS]
    assert 0 < len(k["results"]) < k["plan"] == len(ids)
    assert [r["desc"] for r in k["results"]] == ids[:len(k["results"])]

"""The failing request of every INIT_VM check: in the report, and replayable.

A QA lab that sees a failure wants the exact request that showed it, to send again with
`kvmtdx init-vm --request` (on the same kernel, or a patched one) and to attach to a bug.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import TRAP_CHECKS, run_cli

from kvmtdx.model.requests import request_from_json

BYPASS = TRAP_CHECKS


def _kind(actual: str) -> str:
    """The outcome kind a check's `actual` names ("0x7.0 EDX[18] PCONFIG: ACCEPTED" too)."""
    return actual.rsplit(": ", 1)[-1].split()[0]


def _verify(capsys: pytest.CaptureFixture[str], spec: str, *extra: str) -> dict[str, Any]:
    r = run_cli(capsys, "verify", "--simulate", spec, "--format", "json", *extra)
    assert r.rc == 1, r.err
    return r.json()


def test_each_failing_init_vm_check_carries_its_request(
        capsys: pytest.CaptureFixture[str]) -> None:
    data = _verify(capsys, "2.0:upstream")
    by_id = {c["id"]: c for c in data["checks"]}
    for cid in BYPASS:
        req = by_id[cid]["request"]
        assert req is not None, cid
        parsed = request_from_json(req, cid)  # the init-vm --request format
        assert any(e.function == 7 and e.index == 5 for e in parsed.init_vm.entries)
    assert all(c["request"] is None for c in data["checks"] if c["status"] != "fail")
    text = run_cli(capsys, "verify", "--simulate", "2.0:upstream").out
    block = text[text.index("FAIL adversarial_denylist_bypass_waitpkg"):]
    assert "    request:  " in block.split("FAIL adversarial_denylist_bypass_hle_rtm")[0]
    assert "0x7.5 unflagged ecx=0x20" in block


@pytest.mark.parametrize(("spec", "ids"), [
    ("2.0:upstream", BYPASS),
    ("2.0:rfc-v2:flags_unchecked", ("init_vm_flags_rejected",)),
    ("2.0:rfc-v2:allowlist_skips_7_0_edx", ("init_vm_unreported_bits_refused",)),
    ("2.0:rfc-v2:hw_error_not_copied", ("init_vm_module_status_written_back",)),
])
def test_save_failures_writes_requests_that_init_vm_replays(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, spec: str,
        ids: tuple[str, ...]) -> None:
    out = tmp_path / "failures"
    data = _verify(capsys, spec, "--save-failures", str(out))
    fails = {c["id"]: c for c in data["checks"] if c["status"] == "fail"}
    assert set(ids) <= set(fails)
    saved = sorted(p.name for p in out.iterdir())
    assert saved == sorted(f"{cid}.json" for cid, c in fails.items() if c["request"])
    for cid in ids:
        path = out / f"{cid}.json"
        doc = json.loads(path.read_text())
        assert (doc["schema"], doc["kind"]) == (1, "request")
        assert cid in doc["about"]
        r = run_cli(capsys, "init-vm", "--simulate", spec, "--request", str(path))
        assert r.rc == 0, r.err
        assert r.json()["outcome"] == _kind(fails[cid]["actual"]), cid


def test_save_failures_is_checked_before_the_run(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    for bad in (a_file, tmp_path / "missing" / "deeper"):
        r = run_cli(capsys, "verify", "--simulate", "2.0:upstream", "--save-failures", str(bad))
        assert (r.rc, r.out) == (2, "")
        assert "--save-failures" in r.err and str(bad) in r.err and r.err.count("\n") == 1


def test_a_passing_run_saves_nothing(capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    # rfc-v2 passes on 1.5.01 alone (no leaf 0x1F, so no WARN to provoke).
    r = run_cli(capsys, "verify", "--simulate", "1.5.01:rfc-v2", "--save-failures",
                str(tmp_path / "none"))
    assert r.rc == 0
    assert list((tmp_path / "none").iterdir()) == []

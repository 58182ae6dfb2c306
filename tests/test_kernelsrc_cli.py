"""`--kernel-source` and `--patch` on the command line: the same suite, the tree's own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli
from kernelsrc_support import BYPASS, WARN, linux_tree


@pytest.fixture(scope="module")
def tree() -> Path:
    return linux_tree()


def _failed(doc: dict[str, object]) -> set[str]:
    checks = doc["checks"]
    assert isinstance(checks, list)
    return {c["id"] for c in checks if c["status"] == "fail"}


def test_verify_on_the_upstream_tree_reports_the_bypass(
        tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "verify", "--kernel-source", str(tree), "--module", "2.0",
                "--format", "json")
    assert r.rc == 1
    doc = json.loads(r.out)
    assert _failed(doc) == BYPASS | WARN
    assert doc["policy"] == "upstream"
    assert doc["backend"].startswith("kernel source (Linux 7.3")


def test_verify_with_the_reconstructed_series_fails_only_the_warn(
        tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "verify", "--kernel-source", str(tree), "--patch", "rfc-v2",
                "--format", "json")
    assert r.rc == 1, r.out
    doc = json.loads(r.out)
    assert doc["policy"] == "rfc-v2" and _failed(doc) == WARN


def test_patch_without_a_tree_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "verify", "--patch", "rfc-v2")
    assert r.rc == 2
    assert "--patch needs --kernel-source" in r.err


@pytest.mark.parametrize("other", [["--simulate", "2.0"], ["--backend", "helpers:no_tdx"]])
def test_kernel_source_excludes_the_other_backends(
        other: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    r = run_cli(capsys, "verify", "--kernel-source", str(tmp_path), *other)
    assert r.rc == 2
    assert "exclude each other" in r.err


def test_the_effective_group_skips_there_saying_why(
        tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The kernel-source host runs KVM's VM-level TDX code only: every vCPU ioctl is ENOTTY,
    so no TD's CPUID can be read back, and each check of the group says so."""
    r = run_cli(capsys, "verify", "--kernel-source", str(tree), "--module", "2.0",
                "--group", "effective", "--format", "json")
    assert r.rc == 0, r.out  # skips pass (TDX is here; only the vCPU path is not)
    checks = json.loads(r.out)["checks"]
    assert checks and all(c["status"] == "skip" for c in checks)
    assert all("ENOTTY" in c["detail"] for c in checks), [c["detail"] for c in checks]
    r = run_cli(capsys, "td-cpuid", "--kernel-source", str(tree), "--format", "json")
    doc = json.loads(r.out)
    assert doc["init_vm"]["outcome"] == "ACCEPTED"
    assert doc["effective_error"] == {"step": "KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)",
                                      "errno": "ENOTTY"}

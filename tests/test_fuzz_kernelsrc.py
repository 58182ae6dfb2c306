"""`kvmtdx fuzz --kernel-source`: the kernel's own KVM TDX code, fuzzed against the mirror.

Linux 7.3 as it is runs clean (the mirror's upstream is that kernel, its denylist bypass
included); a bug a user puts into a copy of the tree is found and shrunk, and the replay
file gives the same answer through `kvmtdx init-vm --kernel-source`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli
from kernelsrc_support import copy_tree, linux_tree

from kvmtdx.errors import ExitCode
from kvmtdx.kernelsrc.extract import TDX_C

COUNT_CHECK = "\tif (copy_cnt != cpuid->nent)\n\t\treturn -EINVAL;\n"


@pytest.fixture(scope="module")
def tree() -> Path:
    return linux_tree()


def test_linux_7_3_as_it_is_runs_clean(capsys: pytest.CaptureFixture[str], tree: Path) -> None:
    r = run_cli(capsys, "fuzz", "--kernel-source", str(tree), "--seed", "1", "--no-db",
                "--max-tds", "1000", "--format", "json")
    doc = r.json()
    assert r.rc == ExitCode.PASS and doc["findings"] == []
    assert doc["policy"] == "upstream" and doc["host_identity"]["simulated"]["policy"] is None


def test_a_count_check_dropped_from_a_copy_of_the_tree_is_found(
        capsys: pytest.CaptureFixture[str], tree: Path, tmp_path: Path) -> None:
    copy = copy_tree(tree, tmp_path / "linux")
    source = (copy / TDX_C).read_text()
    assert source.count(COUNT_CHECK) == 1
    (copy / TDX_C).write_text(source.replace(COUNT_CHECK, ""))
    save = tmp_path / "found"
    r = run_cli(capsys, "fuzz", "--kernel-source", str(copy), "--seed", "1", "--first",
                "--no-db", "--format", "json", "--save", str(save))
    assert r.rc == ExitCode.FAIL
    found = [f for f in r.json()["findings"] if f["failing"]]
    count = [f for f in found if f["predicted"] and f["predicted"]["check"] == "count_mismatch"]
    assert count, [f["expected"] for f in found]
    f = min(count, key=lambda f: len(f["request"]["cpuid"]))
    assert f["reproduced"] and len(f["request"]["cpuid"]) <= 4
    got = run_cli(capsys, "init-vm", "--kernel-source", str(copy), "--request",
                  str(save / f["replay"])).json()
    assert (got["outcome"], got["errno"]) == (f["observed"]["outcome"], f["observed"]["errno"])

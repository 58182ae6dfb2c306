"""Where reports go: --output and the other file-writing options (--emit-allowlist,
--save-module) write as sh's `>` does for what is not a regular file (write through
symlinks, devices and FIFOs), replace a regular file atomically, honour the umask,
check their paths before the run, and say on stderr where the report went.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import run_cli

from kvmtdx import cli

# A quick command per file-writing option, with the file as its last argument.
WRITERS: dict[str, list[str]] = {
    "--output": ["predict", "--module", "2.0", "--format", "json", "--output"],
    "--save-module": ["caps", "--simulate", "2.0", "--policy", "upstream", "--save-module"],
    "--emit-allowlist": ["probe", "--simulate", "2.0:rfc-v2", "--emit-allowlist"],
}


def _kvmtdx(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmtdx", *argv], capture_output=True,
                          text=True, check=False, cwd=cwd, timeout=120)


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------
# What sh's `>` does: write through symlinks and to devices and FIFOs.


def test_a_symlink_is_written_through_not_replaced(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("old\n")
    link = tmp_path / "link.json"
    link.symlink_to(target.name)
    rc, _, err = run_cli(capsys, *WRITERS["--output"], str(link))
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == target.name
    assert json.loads(target.read_text())["kind"] == "predict"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_a_link_to_stdout_reaches_stdout(tmp_path: Path) -> None:
    link = tmp_path / "stdout.json"
    link.symlink_to("/dev/stdout")
    res = _kvmtdx(*WRITERS["--output"], str(link), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["kind"] == "predict"
    assert link.is_symlink()


def test_a_link_to_dev_null_stays_a_link(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    link = tmp_path / "null.json"
    link.symlink_to("/dev/null")
    rc, _, err = run_cli(capsys, *WRITERS["--output"], str(link))
    assert rc == 0, err
    assert link.is_symlink() and stat.S_ISCHR(os.stat(link).st_mode)


def test_dev_null_stays_a_character_device() -> None:
    before = os.stat("/dev/null")
    assert stat.S_ISCHR(before.st_mode)
    try:
        res = _kvmtdx(*WRITERS["--output"], "/dev/null", cwd=Path("/"))
        assert res.returncode == 0 and res.stdout == "", res.stderr
    finally:
        after = os.stat("/dev/null")
        if not stat.S_ISCHR(after.st_mode):  # undo the damage before failing
            os.unlink("/dev/null")
            os.mknod("/dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            os.chmod("/dev/null", 0o666)
    assert (after.st_mode, after.st_rdev) == (before.st_mode, before.st_rdev)


def test_a_fifo_gets_the_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the writer need not wait
    try:
        rc, _, err = run_cli(capsys, *WRITERS["--output"], str(fifo))
        data = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert rc == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert json.loads(data)["kind"] == "predict"


# ---------------------------------------------------------------------------
# Modes: the umask for a new file, the old mode for a replaced one.


@pytest.mark.parametrize("option", list(WRITERS))
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_new_file_honours_the_umask(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      umask: Callable[[int], int], option: str, mask: int,
                                      mode: int) -> None:
    umask(mask)
    path = tmp_path / "new.json"
    rc, _, err = run_cli(capsys, *WRITERS[option], str(path))
    assert rc == 0, err
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_replaced_file_keeps_its_mode(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                        umask: Callable[[int], int]) -> None:
    path = tmp_path / "old.json"
    path.write_text("old\n")
    path.chmod(0o640)
    rc, _, err = run_cli(capsys, *WRITERS["--output"], str(path))
    assert rc == 0, err
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert json.loads(path.read_text())["kind"] == "predict"
    assert [p.name for p in tmp_path.iterdir()] == ["old.json"]  # no temp file left


# ---------------------------------------------------------------------------
# Paths are checked before the run; a failed write still shows the report.


def _one_line_naming(err: str, option: str, path: str, why: str) -> None:
    assert err.count("\n") == 1 and err.startswith("kvmtdx: error: "), err
    assert option in err and path in err and why in err, err


# The same options on a backend that fails the test if opened: a bad path must cost nothing,
# not a whole probe.
BEFORE_RUN: dict[str, list[str]] = {
    "--output": ["verify", "--backend", "helpers:must_not_run", "--output"],
    "--save-module": ["caps", "--backend", "helpers:must_not_run", "--policy", "upstream",
                      "--save-module"],
    "--emit-allowlist": ["probe", "--backend", "helpers:must_not_run", "--emit-allowlist"],
}
BAD_PATHS: list[tuple[str, str]] = [
    ("missing/report.json", "no such directory"),
    ("file.txt/report.json", "not a directory"),
    ("folder", "is a directory"),
]


@pytest.mark.parametrize("option", list(WRITERS))
@pytest.mark.parametrize(("where", "why"), BAD_PATHS)
def test_a_bad_output_path_is_refused_before_the_run(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, option: str, where: str,
        why: str) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    path = str(tmp_path / where)
    rc, out, err = run_cli(capsys, *BEFORE_RUN[option], path)
    assert (rc, out) == (2, ""), err
    _one_line_naming(err, option, path, why)


def test_a_directory_that_is_not_writable_is_refused_before_the_run() -> None:
    # Not under tmp_path: as root the check runs as nobody, who must reach the folder.
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        folder = base / "ro"
        folder.mkdir(mode=0o555)
        path = str(folder / "report.json")
        rc, err = _unprivileged([*BEFORE_RUN["--output"], path])
    finally:
        shutil.rmtree(base)
    assert rc == 2, err
    _one_line_naming(err, "--output", path, "not writable")


def _unprivileged(argv: list[str]) -> tuple[int, str]:
    """`kvmtdx ARGV` in a forked child; as root, the child first becomes nobody (root may
    write anywhere).  The exit code and stderr."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.dup2(w, 2)
            sys.stderr = os.fdopen(2, "w")
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


def test_a_write_that_fails_after_the_run_still_prints_the_report(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    link = tmp_path / "full.json"
    link.symlink_to("/dev/full")  # every write: ENOSPC
    rc, out, err = run_cli(capsys, *WRITERS["--output"], str(link))
    assert rc == 2
    assert json.loads(out)["kind"] == "predict"
    assert err == (f"kvmtdx: error: --output {link}: cannot write: "
                   f"{os.strerror(errno.ENOSPC)} (the report went to standard output)\n")


def test_a_failed_replace_names_the_users_path_and_leaves_no_temp_file(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmtdx import outfile

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outfile, "_write_all", full)
    path = tmp_path / "report.json"
    rc, out, err = run_cli(capsys, *WRITERS["--output"], str(path))
    assert rc == 2 and json.loads(out)["kind"] == "predict"
    assert err == (f"kvmtdx: error: --output {path}: cannot write: "
                   f"{os.strerror(errno.ENOSPC)} (the report went to standard output)\n")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# With --output the console still hears the verdict, on stderr.


def test_verify_says_its_verdict_on_stderr(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    rc, out, err = run_cli(capsys, "verify", "--simulate", "2.0:upstream", "--format", "json",
                           "--output", str(path))
    assert (rc, out) == (1, "")
    s = json.loads(path.read_text())["summary"]
    # The bypass (3 checks, and WAITPKG in the TD it lets through), the kernel WARN on a
    # malformed leaf 0x1F; set_cpuid2_consistency informational.
    assert err == (f"kvmtdx verify: FAIL ({s['passed']} passed, 5 failed, {s['skipped']} "
                   f"skipped, 1 informational of {s['total']} checks) -> {path}\n")


def test_a_verify_skip_says_why_on_stderr(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    path = tmp_path / "report.txt"
    rc, out, err = run_cli(capsys, "verify", "--backend", "helpers:no_tdx", "--output", str(path))
    assert (rc, out) == (4, "")
    assert err.startswith("kvmtdx verify: SKIP (KVM on this host does not offer KVM_X86_TDX_VM")
    assert err.endswith(f") -> {path}\n") and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "rc", "line"), [
    (["probe", "--simulate", "2.0:rfc-v2"], 0, "kvmtdx probe: PASS ("),
    (["probe", "--simulate", "2.0:rfc-v2:allowlist_skips_row_7_1"], 1, "kvmtdx probe: FAIL ("),
    (["diff", "--module", "2.0", "--policy", "upstream", "--policy", "rfc-v2"], 1,
     "kvmtdx diff: "),
    (["info", "--simulate", "2.0"], 0, "kvmtdx info: TDX usable -> "),
    (["caps", "--simulate", "2.0"], 0, "kvmtdx caps: "),
    (["predict", "--module", "2.0"], 0, "kvmtdx predict: "),
    (["verify", "--simulate", "list"], 0, "kvmtdx verify: "),
])
def test_every_command_writing_to_output_says_so_on_stderr(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], rc: int,
        line: str) -> None:
    path = tmp_path / "out"
    r = run_cli(capsys, *argv, "--output", str(path))
    assert (r.rc, r.out) == (rc, ""), r.err
    assert r.err.startswith(line) and r.err.endswith(f" -> {path}\n"), r.err
    assert r.err.count("\n") == 1
    assert path.stat().st_size > 0


def test_diff_counts_its_differences_on_stderr(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    path = tmp_path / "diff.txt"
    r = run_cli(capsys, "diff", "--module", "2.0", "--policy", "upstream", "--policy", "rfc-v2",
                "--output", str(path))
    n = int(path.read_text().split("TDs can no longer be given (")[1].split(")")[0])
    assert r.err.startswith(f"kvmtdx diff: {n} bits no longer available, ")


def test_without_output_stderr_stays_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, *WRITERS["--output"][:-1])
    assert r.rc == 0 and r.err == ""


def test_a_directory_option_is_checked_the_same_way(tmp_path: Path) -> None:
    # For options naming a folder to write files into (e.g. a folder of failing requests).
    from kvmtdx.outfile import OutputError, check_directory

    (tmp_path / "file.txt").write_text("x")
    check_directory("--dir", str(tmp_path))  # exists
    check_directory("--dir", str(tmp_path / "new"))  # can be created
    for where, why in [("missing/new", "no such directory"),
                       ("file.txt", "exists and is not a directory"),
                       ("file.txt/new", "not a directory")]:
        with pytest.raises(OutputError) as e:
            check_directory("--dir", str(tmp_path / where))
        assert str(e.value).startswith(f"--dir {tmp_path / where}: ") and why in str(e.value)

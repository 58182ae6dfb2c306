"""Writing the files kvmtdx is told to write (--output, --emit-allowlist, --save-module, ...).

What is not a regular file is written as sh's `>` writes it: through symlinks, into
a device or a FIFO (`--output /dev/stdout` reaches stdout, `--output /dev/null` stays
a device).  A regular file (a symlink to one: its target) is replaced atomically: a
temporary file beside the target, renamed over it, so a reader never sees half a
report.  A new file gets 0666 less the umask, as `>` gives it; a replaced one keeps
its mode.

`check_file` and `check_directory` say before a run whether a path can be written,
so a typo costs nothing rather than a whole probe; every error names the option
and the path the user gave, never a temporary file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable

from kvmtdx.errors import DataError

STDOUT = "-"


class OutputError(DataError):
    """A path the user gave cannot be written (exit 2).  `path` is theirs."""

    def __init__(self, option: str, path: str, why: str) -> None:
        super().__init__(f"{option} {path}: {why}")
        self.option = option
        self.path = path
        self.why = why


def _stat(path: str) -> os.stat_result | None:
    """The file `path` names, through symlinks; None when nothing is there (yet)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _writable_directory(option: str, path: str, folder: str) -> None:
    shown = folder or "."
    try:
        st = os.stat(shown)
    except FileNotFoundError:
        raise OutputError(option, path, f"no such directory {shown}") from None
    except NotADirectoryError:
        raise OutputError(option, path, f"{_first_file(shown)} is not a directory") from None
    except OSError as e:
        raise OutputError(option, path, f"cannot reach {shown}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(option, path, f"{shown} is not a directory")
    if not os.access(shown, os.W_OK | os.X_OK):
        raise OutputError(option, path, f"directory {shown} is not writable")


def _first_file(path: str) -> str:
    """The first component of `path` that exists and is not a directory."""
    parts = path.split(os.sep)
    for i in range(1, len(parts) + 1):
        head = os.sep.join(parts[:i]) or os.sep
        if os.path.exists(head) and not os.path.isdir(head):
            return head
    return path


def _target(option: str, path: str) -> os.stat_result | None:
    """`_stat`, with what stands in the way as an OutputError."""
    try:
        return _stat(path)
    except NotADirectoryError:
        raise OutputError(option, path, f"{_first_file(path)} is not a directory") from None
    except OSError as e:
        raise OutputError(option, path, f"cannot reach it: {e.strerror}") from None


def check_file(option: str, path: str) -> None:
    """Raise OutputError unless `path` could be written as a report file."""
    if path == STDOUT:
        return
    st = _target(option, path)
    if st is None or stat.S_ISREG(st.st_mode):
        real = os.path.realpath(path)
        _writable_directory(option, path, os.path.dirname(real))
        if st is not None and not os.access(real, os.W_OK):
            raise OutputError(option, path, "not writable")
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(option, path, "is a directory")
    if stat.S_ISSOCK(st.st_mode):
        raise OutputError(option, path, "is a socket")
    if not os.access(path, os.W_OK):
        raise OutputError(option, path, "not writable")


def check_directory(option: str, path: str) -> None:
    """Raise OutputError unless `path` is, or can be created as, a writable directory."""
    st = _target(option, path)
    if st is None:
        _writable_directory(option, path, os.path.dirname(os.path.realpath(path)))
        return
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(option, path, "exists and is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(option, path, "directory not writable")


def argument(check: Callable[[str, str], None], option: str) -> Callable[[str], str]:
    """An argparse `type=` that runs `check` on the path as the command line is parsed."""
    import argparse

    def checked(path: str) -> str:
        try:
            check(option, path)
        except OutputError as e:
            raise argparse.ArgumentTypeError(f"{path}: {e.why}") from None
        return path
    return checked


# ---------------------------------------------------------------------------
# Writing.


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_through(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _replace(real: str, data: bytes, mode: int | None) -> None:
    """`data` into a new file beside `real`, renamed over it; `mode` kept when given."""
    folder, name = os.path.split(real)
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            # 0o666: the kernel takes the umask off, as for any new file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write(text: str, path: str, option: str) -> None:
    """`text` into `path` (see the module's doc); OutputError naming `option` and `path`."""
    data = text.encode()
    try:
        st = _stat(path)
        real = os.path.realpath(path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            _write_through(path, data)
        elif st is not None and not _same_file(real, st):
            # A magic link (/proc/self/fd/N) to a file with no path of its own.
            _write_through(path, data)
        else:
            _replace(real, data, None if st is None else stat.S_IMODE(st.st_mode))
    except OSError as e:
        raise OutputError(option, path, f"cannot write: {e.strerror}") from None


def _same_file(path: str, st: os.stat_result) -> bool:
    there = _stat(path)
    return there is not None and (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino)

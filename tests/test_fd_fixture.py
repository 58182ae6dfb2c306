"""The fd-leak fixture must see a leak, or it proves nothing."""

from __future__ import annotations

import os

from conftest import FdSnapshot


def test_snapshot_sees_a_leaked_fd_and_not_a_closed_one() -> None:
    before = FdSnapshot()
    r, w = os.pipe()
    try:
        leaks = FdSnapshot().leaked_since(before)
        assert any(str(r) in leak for leak in leaks) and any(str(w) in leak for leak in leaks)
    finally:
        os.close(r)
        os.close(w)
    assert FdSnapshot().leaked_since(before) == []


def test_snapshot_sees_a_leaked_file_through_psutil() -> None:
    before = FdSnapshot()
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        assert FdSnapshot().num_fds == before.num_fds + 1
        assert FdSnapshot().leaked_since(before)
    finally:
        os.close(fd)

"""The running kernel's own account of a WARN: its log (/dev/kmsg), kernel.panic_on_warn and
the taint flags.

/dev/kmsg gives one record per read(): `PRIORITY,SEQUENCE,TIMESTAMP,FLAGS;MESSAGE`, then
continuation lines starting with a space (dictionary data, skipped here).  Opened
non-blocking, a read at the end of the buffer fails with EAGAIN; a record overwritten
while reading fails with EPIPE and the next read goes on.  A file laid out the same way
(one record a line) reads alike, which is how the tests feed it.  Reading it needs root
(or CAP_SYSLOG) where kernel.dmesg_restrict is set.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

KMSG = "/dev/kmsg"
PANIC_ON_WARN = "/proc/sys/kernel/panic_on_warn"
TAINTED = "/proc/sys/kernel/tainted"
TAINT_WARN = 1 << 9  # 'W': the kernel issued a warning (Documentation/admin-guide/tainted-kernels)
# What Linux 6.16 to 7.3 log with the WARN of a failed TDH.MNG.INIT (arch/x86/kvm/vmx/tdx.c).
SEAMCALL_FAILED = "SEAMCALL TDH_MNG_INIT failed"


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    message: str


class LogUnreadable(Exception):
    """The kernel log cannot be read here; the message says why, naming the file."""


@dataclass(frozen=True)
class KernelLog:
    """The kernel log and its sysctls, at paths a test may replace."""

    kmsg: str = KMSG
    panic_on_warn_path: str = PANIC_ON_WARN
    tainted_path: str = TAINTED

    def records(self) -> list[Record]:
        """Every record the log still holds, oldest first."""
        try:
            fd = os.open(self.kmsg, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise LogUnreadable(f"{self.kmsg}: {e.strerror}") from None
        chunks: list[bytes] = []
        try:
            while True:
                try:
                    chunk = os.read(fd, 16384)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.EPIPE:
                        continue  # overwritten while we read: the next record follows
                    raise LogUnreadable(f"{self.kmsg}: {e.strerror}") from None
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        return _parse(b"".join(chunks).decode("utf-8", "replace"))

    def mark(self) -> int:
        """The sequence number of the newest record (-1 for an empty log)."""
        return max((r.seq for r in self.records()), default=-1)

    def since(self, mark: int) -> list[Record]:
        return [r for r in self.records() if r.seq > mark]

    def panic_on_warn(self) -> bool | None:
        """kernel.panic_on_warn (None: unreadable)."""
        value = _read_int(self.panic_on_warn_path)
        return None if value is None else value != 0

    def tainted(self) -> int | None:
        return _read_int(self.tainted_path)


def _parse(text: str) -> list[Record]:
    out: list[Record] = []
    for line in text.splitlines():
        if not line or line.startswith(" ") or ";" not in line:
            continue
        head, _, message = line.partition(";")
        fields = head.split(",")
        if len(fields) < 2 or not fields[1].strip().isdigit():
            continue
        out.append(Record(int(fields[1]), message))
    return out


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None

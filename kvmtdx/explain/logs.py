"""Find TDX statuses and KVM errnos in what people paste: log lines or a bare value.

Recognised shapes (each a regular expression over one line; the first that
matches a line wins, the generic ones only when nothing else did):

- the kernel (Linux 7.3 arch/x86/kvm/vmx/tdx.c __TDX_BUG_ON):
  `kvm_intel: SEAMCALL TDH_MNG_INIT failed: 0x<status>, rcx 0x<rcx>`; the WARN
  splat that goes with it (`WARNING: ... at arch/x86/kvm/vmx/tdx.c:<line> <fn>`);
  `virt/tdx: SEAMCALL (0x<leaf>) failed: 0x<status>` (seamcall_internal.h);
  KVM's 'All packages need to have online CPU to create TD';
- QEMU (target/i386/kvm/tdx.c): `TDX ioctl KVM_TDX_INIT_VM failed, hw_errors:
  0x<status>: <strerror>`, older `KVM_TDX_INIT_VM failed: <strerror>`, and the
  feature warnings `TDX doesn't support requested feature: CPUID.07H:EDX.<name>
  [bit N]` (cpu.c mark_unavailable_features);
- libvirt wrapping QEMU's stderr (`internal error: QEMU unexpectedly closed the
  monitor (vm='td'): ...`, `process exited while connecting to monitor: ...`);
- cloud-hypervisor: `Failed to initialize TDX: <strerror> (os error N)` and the
  Debug form `InitializeTdx(Os { code: N, ... })`;
- any hypervisor log: `TDH.MNG.INIT failed with status: 0x<status>`;
- generic: a 16-digit hex TDX status with or without 0x, `hw_error=...`, and
  errno names or strerror texts on lines that mention TDX or KVM.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TextIO

from kvmtdx.errors import DataError
from kvmtdx.explain import statuses
from kvmtdx.status import STATUS_MASK, TdxStatus

MAX_INPUT = 16 << 20  # a pasted log, not a disk image


class Kind(str, Enum):
    STATUS = "status"
    ERRNO = "errno"
    FEATURE = "feature"  # a VMM said a CPUID feature it was asked for is unavailable
    WARN = "warn"  # the kernel's WARN splat of TDX_BUG_ON


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing found, with the line it came from."""

    kind: Kind
    source: str  # kernel | qemu | libvirt | cloud-hypervisor | hypervisor | generic | argument
    value: int  # the status, the errno, the feature's bit, or the source line of a WARN
    origin: str = "argument"
    line_no: int = 0
    line: str = ""
    ioctl: str | None = None
    seamcall: str | None = None
    rcx: int | None = None
    hw_error: int | None = None
    leaf: int | None = None
    register: str | None = None
    name: str | None = None  # the feature's name, or the function of a WARN
    why: str | None = None  # the VMM's words: "TDX doesn't support requested feature"


# --- values -------------------------------------------------------------------

_STRERRORS = {os.strerror(code).lower(): code for code in sorted(_errno.errorcode)}


def errno_from_text(text: str) -> int | None:
    """EINVAL, -EINVAL, -22, 22, or 'Invalid argument' -> 22."""
    t = text.strip().rstrip(".").lstrip("-")
    if t.isdigit() and 0 < int(t) < 4096:
        return int(t)
    value = getattr(_errno, t.upper(), None) if t.upper().startswith("E") else None
    if isinstance(value, int) and t.upper() in _errno.errorcode.values():
        return value
    return _STRERRORS.get(t.lower())


def status_from_name(text: str) -> int | None:
    status = TdxStatus.__members__.get(text.strip().upper())
    return None if status is None else int(status)


def _hex(text: str) -> int:
    return int(text, 16)


_STATUS_TOKEN = re.compile(r"(?:0x[0-9a-f]{1,16}|[0-9a-f]{16}|[0-9a-f]*[a-f][0-9a-f]*)",
                           re.I)


def classify_token(text: str) -> Finding | None:
    """A bare value given as an argument: a status, an errno, or None."""
    t = text.strip()
    if not t or len(t) > 40:
        return None
    err = errno_from_text(t)
    if err is not None and not t.lower().startswith("0x"):
        return Finding(Kind.ERRNO, "argument", err, line=t)
    named = status_from_name(t)
    if named is not None:
        return Finding(Kind.STATUS, "argument", named, line=t)
    if _STATUS_TOKEN.fullmatch(t) and (t.lower().startswith("0x") or len(t) >= 9):
        value = int(t, 16)
        # Wider than a status: not one (read_input then says what it is not, exit 2).
        return Finding(Kind.STATUS, "argument", value, line=t) if value >> 64 == 0 else None
    return None


def plausible_status(value: int) -> bool:
    """A 64-bit value that reads as a TDX status: the error bit, bits 59:48 (reserved)
    clear, and a known status or class (so kernel addresses are not taken for one)."""
    if not value >> 63 or value >> 48 & 0xFFF:
        return False
    kb = statuses.knowledge()
    status_class = value >> statuses.CLASS_SHIFT & 0xFF
    return (value & STATUS_MASK) in kb.statuses or status_class in kb.classes


# --- recognisers ------------------------------------------------------------------

HEX = r"(?:0x)?([0-9a-fA-F]{1,16})(?![0-9A-Za-z])"
_KERNEL_BUG_ON = re.compile(r"SEAMCALL (TDH_[A-Z0-9_]+) failed: " + HEX + r"((?:, \w+,? " + HEX
                            + r")*)")
_KERNEL_ARGS = re.compile(r"(\w+),? (?:0x)?([0-9a-fA-F]+)")
_KERNEL_SEAMCALL_ERR = re.compile(r"SEAMCALL \(0x([0-9a-fA-F]+)\) failed: " + HEX)
_KERNEL_WARN = re.compile(r"WARNING: .*? at arch/x86/kvm/vmx/tdx\.c:(\d+) (\w+)")
_KERNEL_PACKAGES = re.compile(r"All packages need to have online CPU to create TD")
_QEMU_IOCTL = re.compile(r"TDX ioctl (KVM_TDX_[A-Z_]+) failed, hw_errors?: " + HEX
                         + r"(?::\s*([A-Za-z][\w /'-]*[a-z]))?")
_QEMU_OLD = re.compile(r"(KVM_TDX_[A-Z_]+) failed(?::|,)?\s*(?:\(?(-?\d+)\)?\s*)?([A-Za-z][^:,]*)?")
_QEMU_FEATURE = re.compile(r"((?:TDX|host) doesn't support requested feature|TDX forcibly "
                           r"sets the feature): CPUID\.([0-9A-F]+)H:(E[ABCD]X)(?:\.(\S+))? "
                           r"\[bit (\d+)\]")
_LIBVIRT = re.compile(r"(?:QEMU|qemu) unexpectedly closed the monitor|process exited while "
                      r"connecting to monitor|internal error: .*qemu", re.I)
_CH_OS_ERROR = re.compile(r"(?:Failed to initialize TDX|Error initializing TDX|InitializeTdx)"
                          r".*?(?:\(os error (\d+)\)|Os \{ code: (\d+))")
_SEAMCALL_STATUS = re.compile(r"(TDH[._][A-Z0-9._]+?)(?: SEAMCALL)? failed(?: with)?(?: status)?"
                              r"[:=]?\s*" + HEX, re.I)
_ANY_HEX = re.compile(r"(?<![0-9A-Za-z])(?:0x)?([0-9a-fA-F]{16})(?![0-9A-Za-z])")
_HW_ERROR = re.compile(r"hw_errors?\s*[=:]\s*" + HEX)
_ERRNO_NAME = re.compile(r"(?<![A-Za-z0-9_])-?(E[A-Z0-9]{2,})(?![A-Za-z0-9_])")
_MENTIONS_TDX = re.compile(r"tdx|kvm|seamcall|tdh[._]", re.I)

Recogniser = Callable[[str], list[Finding]]


def _kernel(line: str) -> list[Finding]:
    m = _KERNEL_BUG_ON.search(line)
    if m:
        args = {k.lower(): _hex(v) for k, v in _KERNEL_ARGS.findall(m.group(3) or "")}
        return [Finding(Kind.STATUS, "kernel", _hex(m.group(2)), seamcall=m.group(1),
                        rcx=args.get("rcx"))]
    m = _KERNEL_SEAMCALL_ERR.search(line)
    if m:
        return [Finding(Kind.STATUS, "kernel", _hex(m.group(2)),
                        seamcall=statuses.seamcall_by_leaf(_hex(m.group(1))))]
    m = _KERNEL_WARN.search(line)
    if m:
        return [Finding(Kind.WARN, "kernel", int(m.group(1)), name=m.group(2))]
    if _KERNEL_PACKAGES.search(line):
        return [Finding(Kind.ERRNO, "kernel", _errno.EIO, ioctl="KVM_TDX_INIT_VM",
                        why="a CPU package has no CPU online")]
    return []


def _qemu(line: str) -> list[Finding]:
    m = _QEMU_FEATURE.search(line)
    if m:
        return [Finding(Kind.FEATURE, "qemu", int(m.group(5)), leaf=_hex(m.group(2)),
                        register=m.group(3).lower(), name=m.group(4), why=m.group(1))]
    m = _QEMU_IOCTL.search(line)
    if m:
        hw = _hex(m.group(2))
        err = errno_from_text(m.group(3) or "")
        out = [Finding(Kind.ERRNO, "qemu", err, ioctl=m.group(1), hw_error=hw)] if err else []
        if hw:
            out.append(Finding(Kind.STATUS, "qemu", hw, ioctl=m.group(1), hw_error=hw))
        return out
    m = _QEMU_OLD.search(line)
    if m:
        err = errno_from_text(m.group(2) or "") or errno_from_text(m.group(3) or "")
        seen = _HW_ERROR.search(line)
        hw_error = _hex(seen.group(1)) if seen else None
        found = [Finding(Kind.ERRNO, "qemu", err, ioctl=m.group(1), hw_error=hw_error)
                 ] if err else []
        if hw_error:
            found.append(Finding(Kind.STATUS, "qemu", hw_error, ioctl=m.group(1)))
        return found
    return []


def _libvirt(line: str) -> list[Finding]:
    if not _LIBVIRT.search(line):
        return []
    return [replace(f, source="libvirt") for f in _qemu(line)]


def _cloud_hypervisor(line: str) -> list[Finding]:
    m = _CH_OS_ERROR.search(line)
    if not m:
        return []
    err = int(m.group(1) or m.group(2))
    return [Finding(Kind.ERRNO, "cloud-hypervisor", err, ioctl="KVM_TDX_INIT_VM")]


def _hypervisor(line: str) -> list[Finding]:
    m = _SEAMCALL_STATUS.search(line)
    if not m:
        return []
    return [Finding(Kind.STATUS, "hypervisor", _hex(m.group(2)),
                    seamcall=statuses.seamcall_name(m.group(1)))]


def _generic(line: str) -> list[Finding]:
    found: list[Finding] = []
    hw = _HW_ERROR.search(line)
    if hw and _hex(hw.group(1)):
        found.append(Finding(Kind.STATUS, "generic", _hex(hw.group(1)), hw_error=_hex(hw.group(1))))
    for m in _ANY_HEX.finditer(line):
        value = _hex(m.group(1))
        if plausible_status(value) and not any(f.value == value for f in found):
            found.append(Finding(Kind.STATUS, "generic", value))
    if not found and _MENTIONS_TDX.search(line):
        for m in _ERRNO_NAME.finditer(line):
            err = errno_from_text(m.group(1))
            if err is not None:
                found.append(Finding(Kind.ERRNO, "generic", err))
                break
    return found


RECOGNISERS: tuple[Recogniser, ...] = (_kernel, _libvirt, _qemu, _cloud_hypervisor, _hypervisor)


def scan(text: str, origin: str) -> list[Finding]:
    """Every finding in `text`, in line order, each with its line."""
    out: list[Finding] = []
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        found: list[Finding] = []
        for recognise in RECOGNISERS:
            found = recognise(line)
            if found:
                break
        else:
            found = _generic(line)
        out += [replace(f, origin=origin, line_no=no, line=line) for f in found]
    return out


# --- inputs ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Input:
    """One thing to explain: a bare value (`token`) or text to scan."""

    origin: str
    text: str
    token: Finding | None = None

    def findings(self) -> list[Finding]:
        if self.token is not None:
            return [replace(self.token, origin=self.origin)]
        return scan(self.text, self.origin)


def read_input(arg: str, stdin: TextIO | None = None) -> Input:
    """`arg` as `kvmtdx explain` takes it: a value, '-' (standard input) or a file."""
    if arg == "-":
        stream = stdin if stdin is not None else sys.stdin
        return Input("-", stream.read(MAX_INPUT))
    token = classify_token(arg)
    if token is not None:
        return Input(arg, arg, token)
    path = Path(arg)
    if not path.is_file():
        raise DataError(f"{arg}: neither a TDX status, an errno nor a readable file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_INPUT)
    except OSError as e:
        raise DataError(f"{arg}: cannot read: {e.strerror}") from None
    return Input(arg, data.decode("utf-8", errors="replace"))

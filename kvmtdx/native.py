"""This machine's native CPUID, read through the Linux cpuid driver, as a Host.

/dev/cpu/N/cpuid answers a 16-byte pread at offset `leaf | subleaf << 32` with
EAX, EBX, ECX, EDX of that CPU (Linux arch/x86/kernel/cpuid.c).  The driver is
a module on most distributions (`modprobe cpuid`) and the node is root-only.

Every leaf a bundled TDX module reads is read (its cpuid_lookup[] entries:
the configurable rows and every leaf it virtualises, 0xD's XSAVE components,
the 0x1F topology, 0x15's TSC ratio...), so the module model starts from what
TDH.SYS.INIT would sample here.  The XCR0 | XSS the host supports comes from
leaf 0xD; what the host KVM really supports may be narrower.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

from kvmtdx.errors import DataError
from kvmtdx.model.profiles import BUNDLED_MODULES, Host, Regs, load_host, load_profile

CPUID_DEVICE = "/dev/cpu/{cpu}/cpuid"
MSR_DEVICE = "/dev/cpu/{cpu}/msr"
CPUINFO = "/proc/cpuinfo"
MSR_IA32_ARCH_CAPABILITIES = 0x10A
ARCH_CAP_TSX_CTRL_MSR = 1 << 7  # Linux arch/x86/include/asm/msr-index.h
LOAD_HINT = "load the cpuid driver with `modprobe cpuid` (as root)"


def native_leaves() -> tuple[tuple[int, int | None], ...]:
    """Every (leaf, sub-leaf) a bundled module reads, in the first module's lookup order."""
    keys: dict[tuple[int, int | None], None] = {}
    for name in BUNDLED_MODULES:
        for e in load_profile(name).tables.lookup:
            keys[e.key] = None
    return tuple(keys)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        in_dev = Path(path).parent.parent == Path("/dev/cpu")
        if in_dev and not Path(path).parent.exists() and any(Path("/dev/cpu").glob("*/cpuid")):
            raise DataError(f"{path}: no such CPU") from None
        raise DataError(f"{path}: no such device: {LOAD_HINT}") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied: reading native CPUID needs root") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror}") from None


def read_cpuid(fd: int, leaf: int, subleaf: int, path: str = "cpuid") -> Regs:
    """One CPUID query through an open cpuid node (or a file laid out like one).

    A file shorter than the offset reads as zeros, as a sparse file's holes do.
    """
    try:
        raw = os.pread(fd, 16, leaf | subleaf << 32)
    except OSError as e:
        if e.errno == errno.EIO:
            raise DataError(f"{path}: leaf 0x{leaf:x}.{subleaf}: the CPU refused the query "
                            f"(is the CPU online?)") from None
        raise DataError(f"{path}: leaf 0x{leaf:x}.{subleaf}: {e.strerror}") from None
    a, b, c, d = struct.unpack("<4I", raw.ljust(16, b"\0"))
    return (a, b, c, d)


def _tsx_ctrl(msr_path: str | None) -> bool:
    """IA32_ARCH_CAPABILITIES.TSX_CTRL_MSR if the msr driver lets us read it; else False."""
    if msr_path is None:
        return False
    try:
        fd = os.open(msr_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        raw = os.pread(fd, 8, MSR_IA32_ARCH_CAPABILITIES)
    except OSError:
        return False
    finally:
        os.close(fd)
    return len(raw) == 8 and bool(struct.unpack("<Q", raw)[0] & ARCH_CAP_TSX_CTRL_MSR)


def _ept_5level(cpuinfo_path: str | None) -> bool:
    """Whether the kernel lists `ept_5level` among the CPU's VMX flags."""
    if cpuinfo_path is None:
        return False
    try:
        text = Path(cpuinfo_path).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("vmx flags"):
            return "ept_5level" in line.split(":", 1)[-1].split()
    return False


def native_host(cpu: int = 0, *, cpuid_path: str | None = None,
                msr_path: str | None = MSR_DEVICE, cpuinfo_path: str | None = CPUINFO) -> Host:
    """A Host from CPU `cpu`'s native CPUID (or `cpuid_path`, a file laid out like the node).

    5-level EPT comes from /proc/cpuinfo's VMX flags and TSX_CTRL from the msr
    driver when readable; either unknown reads as absent.
    """
    path = cpuid_path or CPUID_DEVICE.format(cpu=cpu)
    fd = _open(path)
    try:
        native = {key: read_cpuid(fd, key[0], key[1] or 0, path) for key in native_leaves()}
    finally:
        os.close(fd)
    return Host(
        name=f"native (cpu {cpu})" if cpuid_path is None else f"native ({cpuid_path})",
        native=native,
        ept_5level=_ept_5level(cpuinfo_path),
        tsx_ctrl=_tsx_ctrl(None if msr_path is None else msr_path.format(cpu=cpu)),
    )


def host_by_name(name: str) -> Host:
    """`--host`: "native" reads this machine; "max" or a JSON file as load_host."""
    if name == "native":
        return native_host()
    return load_host(name)

"""The only place that touches C: the cffi object, ioctl numbers, memory and libc.

cffi reads the layouts from `cdefs/kvm_tdx.h` in ABI mode, so nothing is
compiled at install or run time.  The byte codecs live in `kvmtdx.layout`,
which reads the same cdefs in pure Python; this module checks at import that
both readings agree.  Above this module everything is a plain
`kvmtdx.structs` dataclass, `bytes` or `int`; no cdata escapes.  Memory that
the kernel (or the simulated host) reads and writes is owned by `Memory`,
which hands out an integer address, the same thing an ioctl argument is.
"""

from __future__ import annotations

import os
from enum import IntEnum
from typing import Any

import cffi

from kvmtdx import layout

ffi = cffi.FFI()
ffi.cdef(layout.strip_comments(layout.cdefs_text()))
_libc: Any = ffi.dlopen(None)


def _check_layout() -> None:
    """cffi and kvmtdx.layout must read the cdefs alike (the layout test holds both to gcc)."""
    for name, s in layout.STRUCTS.items():
        t: Any = ffi.typeof(f"struct {name}")
        if ffi.sizeof(t) != s.size or [(n, f.offset) for n, f in t.fields] != [
                (f.name, f.offset) for f in s.fields]:
            raise RuntimeError(f"kvmtdx.layout disagrees with cffi on struct {name}")


_check_layout()

# ---------------------------------------------------------------------------
# ioctl numbers: the generic _IOC encoding of include/uapi/asm-generic/ioctl.h
# (8 bits nr, 8 bits type, 14 bits size, 2 bits direction on x86).
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def _iow(type_: int, nr: int, ctype: str) -> int:
    return _ioc(_IOC_WRITE, type_, nr, ffi.sizeof(ctype))


def _iowr(type_: int, nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, ffi.sizeof(ctype))


KVMIO = 0xAE


class Ioctl(IntEnum):
    """The ioctl request numbers kvmtdx sends, as the uapi headers name them."""

    KVM_GET_API_VERSION = _io(KVMIO, 0x00)
    KVM_CREATE_VM = _io(KVMIO, 0x01)
    KVM_CHECK_EXTENSION = _io(KVMIO, 0x03)
    KVM_GET_SUPPORTED_CPUID = _iowr(KVMIO, 0x05, "struct kvm_cpuid2")
    KVM_MEMORY_ENCRYPT_OP = _iowr(KVMIO, 0xBA, "unsigned long")
    KVM_CREATE_VCPU = _io(KVMIO, 0x41)
    KVM_SET_CPUID2 = _iow(KVMIO, 0x90, "struct kvm_cpuid2")
    KVM_GET_CPUID2 = _iowr(KVMIO, 0x91, "struct kvm_cpuid2")
    KVM_ENABLE_CAP = _iow(KVMIO, 0xA3, "struct kvm_enable_cap")


class Cap(IntEnum):
    """KVM_CAP_* numbers kvmtdx asks about or enables."""

    KVM_CAP_SPLIT_IRQCHIP = 121
    KVM_CAP_VM_TYPES = 235


class VmType(IntEnum):
    KVM_X86_DEFAULT_VM = 0
    KVM_X86_SW_PROTECTED_VM = 1
    KVM_X86_SEV_VM = 2
    KVM_X86_SEV_ES_VM = 3
    KVM_X86_SNP_VM = 4
    KVM_X86_TDX_VM = 5


class TdxCommand(IntEnum):
    """kvm_tdx_cmd.id: the sub-commands of KVM_MEMORY_ENCRYPT_OP on a TD."""

    KVM_TDX_CAPABILITIES = 0
    KVM_TDX_INIT_VM = 1
    KVM_TDX_INIT_VCPU = 2
    KVM_TDX_INIT_MEM_REGION = 3
    KVM_TDX_FINALIZE_VM = 4
    KVM_TDX_GET_CPUID = 5


KVM_API_VERSION = 12
KVM_CAP_VM_TYPES = Cap.KVM_CAP_VM_TYPES

O_RDWR = os.O_RDWR
O_CLOEXEC = os.O_CLOEXEC


def vm_type_name(t: int) -> str:
    try:
        return VmType(t).name
    except ValueError:
        return str(t)


# ---------------------------------------------------------------------------
# Memory the kernel reads and writes.


class Memory:
    """A zeroed, owned buffer with a stable address, alive as long as this object."""

    def __init__(self, size_or_data: int | bytes) -> None:
        if isinstance(size_or_data, int):
            self.size = size_or_data
            self._buf: Any = ffi.new(_CHARS, max(size_or_data, 1))
        else:
            # Initialised from the bytes (cffi adds a terminating NUL past the end).
            self.size = len(size_or_data)
            self._buf = ffi.new(_CHARS, size_or_data)
        self._address: int | None = None

    @property
    def address(self) -> int:
        if self._address is None:
            self._address = int(ffi.cast(_UINTPTR, self._buf))
        return self._address

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        n = self.size - offset if size is None else size
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ValueError("read outside the buffer")
        return bytes(ffi.buffer(self._buf + offset, n))

    def write(self, data: bytes, offset: int = 0) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError("write outside the buffer")
        ffi.memmove(self._buf + offset, data, len(data))


# The C types the hot paths cast to, looked up once (ffi.cast parses a type string anew).
_CHAR_P = ffi.typeof("char *")
_UINTPTR = ffi.typeof("uintptr_t")
_CHARS = ffi.typeof("char[]")


def peek(address: int, size: int) -> bytes:
    """Read `size` bytes at a raw address of this process (the simulated host's copy_from_user)."""
    return bytes(ffi.buffer(ffi.cast(_CHAR_P, address), size))


def poke(address: int, data: bytes) -> None:
    """Write bytes at a raw address of this process (the simulated host's copy_to_user)."""
    ffi.memmove(ffi.cast(_CHAR_P, address), data, len(data))


# ---------------------------------------------------------------------------
# libc, for the real syscall seam.  cffi releases the GIL around these calls.


def sys_open(path: str, flags: int) -> int:
    fd = int(_libc.open(path.encode(), ffi.cast("int", flags)))
    if fd < 0:
        e = ffi.errno
        raise OSError(e, os.strerror(e), path)
    return fd


def sys_ioctl(fd: int, request: int, arg: int) -> int:
    ret = int(_libc.ioctl(fd, ffi.cast("unsigned long", request), ffi.cast("unsigned long", arg)))
    if ret < 0:
        e = ffi.errno
        raise OSError(e, os.strerror(e))
    return ret


def sys_close(fd: int) -> None:
    if int(_libc.close(fd)) < 0:
        e = ffi.errno
        raise OSError(e, os.strerror(e))

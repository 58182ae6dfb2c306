"""The only place that touches C: the cffi object, ioctl numbers, and codecs.

The struct layouts come from `cdefs/kvm_tdx.h` in cffi's ABI mode, so nothing
is compiled at install or run time.  Above this module everything is a plain
`kvmtdx.structs` dataclass, `bytes` or `int`; no cdata escapes.  Memory that
the kernel (or the simulated host) reads and writes is owned by `Memory`,
which hands out an integer address, the same thing an ioctl argument is.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from importlib import resources
from pathlib import Path
from typing import Any

import cffi

from kvmtdx.structs import Capabilities, CpuidEntry, InitVm, TdxCmd


def _cdefs_text() -> str:
    # Installed wheels carry the header as the kvmtdx.cdefs package; a source
    # checkout has it at the top level, next to the package.
    try:
        return resources.files("kvmtdx.cdefs").joinpath("kvm_tdx.h").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        here = Path(__file__).resolve().parent.parent / "cdefs" / "kvm_tdx.h"
        return here.read_text()


def _strip_comments(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = len(text) if end < 0 else end + 2
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


ffi = cffi.FFI()
ffi.cdef(_strip_comments(_cdefs_text()))
_libc: Any = ffi.dlopen(None)

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


def _iowr(type_: int, nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, ffi.sizeof(ctype))


KVMIO = 0xAE
KVM_GET_API_VERSION = _io(KVMIO, 0x00)
KVM_CREATE_VM = _io(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _io(KVMIO, 0x03)
KVM_GET_SUPPORTED_CPUID = _iowr(KVMIO, 0x05, "struct kvm_cpuid2")
KVM_MEMORY_ENCRYPT_OP = _iowr(KVMIO, 0xBA, "unsigned long")

KVM_API_VERSION = 12
KVM_CAP_VM_TYPES = 235

KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5

VM_TYPE_NAMES: dict[int, str] = {
    KVM_X86_DEFAULT_VM: "KVM_X86_DEFAULT_VM",
    KVM_X86_SW_PROTECTED_VM: "KVM_X86_SW_PROTECTED_VM",
    KVM_X86_SEV_VM: "KVM_X86_SEV_VM",
    KVM_X86_SEV_ES_VM: "KVM_X86_SEV_ES_VM",
    KVM_X86_SNP_VM: "KVM_X86_SNP_VM",
    KVM_X86_TDX_VM: "KVM_X86_TDX_VM",
}

KVM_TDX_CAPABILITIES = 0
KVM_TDX_INIT_VM = 1
KVM_TDX_INIT_VCPU = 2
KVM_TDX_INIT_MEM_REGION = 3
KVM_TDX_FINALIZE_VM = 4
KVM_TDX_GET_CPUID = 5

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
KVM_MAX_CPUID_ENTRIES = 256

O_RDWR = os.O_RDWR
O_CLOEXEC = os.O_CLOEXEC

# Sizes, derived from the cdefs (never typed in), for the layers above.
SIZEOF_CPUID_ENTRY2: int = ffi.sizeof("struct kvm_cpuid_entry2")
SIZEOF_CPUID2: int = ffi.sizeof("struct kvm_cpuid2")
SIZEOF_TDX_CMD: int = ffi.sizeof("struct kvm_tdx_cmd")
SIZEOF_CAPS_HEADER: int = ffi.sizeof("struct kvm_tdx_capabilities")
SIZEOF_INIT_VM_HEADER: int = ffi.sizeof("struct kvm_tdx_init_vm")
OFFSET_CAPS_NENT: int = ffi.offsetof("struct kvm_tdx_capabilities", "cpuid")
OFFSET_INIT_VM_NENT: int = ffi.offsetof("struct kvm_tdx_init_vm", "cpuid")
OFFSET_CPUID2_PADDING: int = ffi.offsetof("struct kvm_cpuid2", "padding")


def caps_size(nent: int) -> int:
    return SIZEOF_CAPS_HEADER + nent * SIZEOF_CPUID_ENTRY2


def init_vm_size(nent: int) -> int:
    return SIZEOF_INIT_VM_HEADER + nent * SIZEOF_CPUID_ENTRY2


def cpuid2_size(nent: int) -> int:
    return SIZEOF_CPUID2 + nent * SIZEOF_CPUID_ENTRY2


# ---------------------------------------------------------------------------
# Memory the kernel reads and writes.


class Memory:
    """A zeroed, owned buffer with a stable address, alive as long as this object."""

    def __init__(self, size_or_data: int | bytes) -> None:
        size = size_or_data if isinstance(size_or_data, int) else len(size_or_data)
        self._buf: Any = ffi.new("char[]", max(size, 1))
        self.size = size
        if isinstance(size_or_data, bytes):
            ffi.memmove(self._buf, size_or_data, size)

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self._buf))

    def read(self, offset: int = 0, size: int | None = None) -> bytes:
        n = self.size - offset if size is None else size
        if offset < 0 or n < 0 or offset + n > self.size:
            raise ValueError("read outside the buffer")
        return bytes(ffi.buffer(self._buf + offset, n))

    def write(self, data: bytes, offset: int = 0) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError("write outside the buffer")
        ffi.memmove(self._buf + offset, data, len(data))


def peek(address: int, size: int) -> bytes:
    """Read `size` bytes at a raw address of this process (the simulated host's copy_from_user)."""
    return bytes(ffi.buffer(ffi.cast("char *", address), size))


def poke(address: int, data: bytes) -> None:
    """Write bytes at a raw address of this process (the simulated host's copy_to_user)."""
    ffi.memmove(ffi.cast("char *", address), data, len(data))


# ---------------------------------------------------------------------------
# Codecs between bytes and the plain dataclasses.


def _u32(v: int) -> int:
    return v & 0xFFFFFFFF


def _u64(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


def _fill_entry(c: Any, e: CpuidEntry) -> None:
    c.function = _u32(e.function)
    c.index = _u32(e.index)
    c.flags = _u32(e.flags)
    c.eax = _u32(e.eax)
    c.ebx = _u32(e.ebx)
    c.ecx = _u32(e.ecx)
    c.edx = _u32(e.edx)
    for i in range(3):
        c.padding[i] = _u32(e.padding[i])


def _struct_format(ctype: str) -> str:
    """A `struct` format for a C struct of unsigned integer fields, read off the cdefs layout.

    The hot codecs (thousands of INIT_VM requests a second for the prober)
    pack entries with this instead of field-by-field cdata access; deriving it
    from the cffi layout keeps cdefs/ the single source of the layout.
    """
    t: Any = ffi.typeof(ctype)
    fmt, pos = "<", 0
    for _name, f in t.fields:
        ft = f.type
        item, count = (ft.item, ft.length) if ft.kind == "array" else (ft, 1)
        if f.offset > pos:
            fmt += f"{f.offset - pos}x"
        fmt += {1: "B", 2: "H", 4: "I", 8: "Q"}[ffi.sizeof(item)] * count
        pos = f.offset + ffi.sizeof(ft)
    size = ffi.sizeof(t)
    fmt += f"{size - pos}x" if size > pos else ""
    if struct.calcsize(fmt) != size:
        raise RuntimeError(f"cannot express {ctype} as a struct format")
    return fmt


_ENTRY = struct.Struct(_struct_format("struct kvm_cpuid_entry2"))
if [name for name, _ in ffi.typeof("struct kvm_cpuid_entry2").fields] != [
        "function", "index", "flags", "eax", "ebx", "ecx", "edx", "padding"]:
    raise RuntimeError("struct kvm_cpuid_entry2 fields are not in CpuidEntry's order")


def _entry_bytes(e: CpuidEntry) -> bytes:
    m, p = 0xFFFFFFFF, e.padding
    return _ENTRY.pack(
        e.function & m, e.index & m, e.flags & m, e.eax & m, e.ebx & m, e.ecx & m, e.edx & m,
        p[0] & m, p[1] & m, p[2] & m,
    )


def _entries_bytes(entries: tuple[CpuidEntry, ...]) -> bytes:
    return b"".join([_entry_bytes(e) for e in entries])


def _read_entry(c: Any) -> CpuidEntry:
    return CpuidEntry(
        function=int(c.function),
        index=int(c.index),
        flags=int(c.flags),
        eax=int(c.eax),
        ebx=int(c.ebx),
        ecx=int(c.ecx),
        edx=int(c.edx),
        padding=(int(c.padding[0]), int(c.padding[1]), int(c.padding[2])),
    )


def pack_entry(e: CpuidEntry) -> bytes:
    return _entry_bytes(e)


def unpack_entry(data: bytes) -> CpuidEntry:
    f, i, fl, a, b, c, d, p0, p1, p2 = _ENTRY.unpack_from(data)
    return CpuidEntry(f, i, fl, a, b, c, d, (p0, p1, p2))


def pack_cmd(cmd: TdxCmd) -> bytes:
    c: Any = ffi.new("struct kvm_tdx_cmd *")
    c.id = _u32(cmd.id)
    c.flags = _u32(cmd.flags)
    c.data = _u64(cmd.data)
    c.hw_error = _u64(cmd.hw_error)
    return bytes(ffi.buffer(c))


def unpack_cmd(data: bytes) -> TdxCmd:
    c: Any = ffi.new("struct kvm_tdx_cmd *")
    ffi.memmove(c, data[:SIZEOF_TDX_CMD], SIZEOF_TDX_CMD)
    return TdxCmd(id=int(c.id), flags=int(c.flags), data=int(c.data), hw_error=int(c.hw_error))


def _entries_in(data: bytes, header: int, nent: int) -> tuple[CpuidEntry, ...]:
    room = max(0, (len(data) - header) // SIZEOF_CPUID_ENTRY2)
    n = min(nent, room)
    end = header + n * SIZEOF_CPUID_ENTRY2
    return tuple(
        CpuidEntry(f, i, fl, a, b, c, d, (p0, p1, p2))
        for f, i, fl, a, b, c, d, p0, p1, p2 in _ENTRY.iter_unpack(data[header:end])
    )


def pack_capabilities(caps: Capabilities, nent_room: int | None = None) -> bytes:
    """Bytes of a capabilities buffer; `nent_room` entries of space (default: the entries)."""
    room = len(caps.entries) if nent_room is None else nent_room
    if room < len(caps.entries):
        raise ValueError("more entries than room for them")
    raw: Any = ffi.new("char[]", caps_size(room))
    c: Any = ffi.cast("struct kvm_tdx_capabilities *", raw)
    c.supported_attrs = _u64(caps.supported_attrs)
    c.supported_xfam = _u64(caps.supported_xfam)
    c.kernel_tdvmcallinfo_1_r11 = _u64(caps.kernel_tdvmcallinfo_1_r11)
    c.user_tdvmcallinfo_1_r11 = _u64(caps.user_tdvmcallinfo_1_r11)
    c.kernel_tdvmcallinfo_1_r12 = _u64(caps.kernel_tdvmcallinfo_1_r12)
    c.user_tdvmcallinfo_1_r12 = _u64(caps.user_tdvmcallinfo_1_r12)
    if len(caps.reserved) != 250:
        raise ValueError("capabilities.reserved must have 250 words")
    for i, w in enumerate(caps.reserved):
        c.reserved[i] = _u64(w)
    c.cpuid.nent = _u32(caps.nent)
    c.cpuid.padding = _u32(caps.cpuid_padding)
    ffi.memmove(raw + SIZEOF_CAPS_HEADER, _entries_bytes(caps.entries),
                len(caps.entries) * SIZEOF_CPUID_ENTRY2)
    return bytes(ffi.buffer(raw))


def unpack_capabilities(data: bytes) -> Capabilities:
    """Read a capabilities buffer: the header, then min(nent, room) entries."""
    if len(data) < SIZEOF_CAPS_HEADER:
        raise ValueError("buffer shorter than struct kvm_tdx_capabilities")
    raw: Any = ffi.new("char[]", SIZEOF_CAPS_HEADER)
    ffi.memmove(raw, data[:SIZEOF_CAPS_HEADER], SIZEOF_CAPS_HEADER)
    c: Any = ffi.cast("struct kvm_tdx_capabilities *", raw)
    nent = int(c.cpuid.nent)
    return Capabilities(
        supported_attrs=int(c.supported_attrs),
        supported_xfam=int(c.supported_xfam),
        kernel_tdvmcallinfo_1_r11=int(c.kernel_tdvmcallinfo_1_r11),
        user_tdvmcallinfo_1_r11=int(c.user_tdvmcallinfo_1_r11),
        kernel_tdvmcallinfo_1_r12=int(c.kernel_tdvmcallinfo_1_r12),
        user_tdvmcallinfo_1_r12=int(c.user_tdvmcallinfo_1_r12),
        reserved=tuple(int(c.reserved[i]) for i in range(250)),
        nent=nent,
        cpuid_padding=int(c.cpuid.padding),
        entries=_entries_in(data, SIZEOF_CAPS_HEADER, nent),
    )


def pack_init_vm(req: InitVm) -> bytes:
    raw: Any = ffi.new("char[]", init_vm_size(len(req.entries)))
    c: Any = ffi.cast("struct kvm_tdx_init_vm *", raw)
    c.attributes = _u64(req.attributes)
    c.xfam = _u64(req.xfam)
    for name, words, n in (
        ("mrconfigid", req.mrconfigid, 6),
        ("mrowner", req.mrowner, 6),
        ("mrownerconfig", req.mrownerconfig, 6),
        ("reserved", req.reserved, 12),
    ):
        if len(words) != n:
            raise ValueError(f"init_vm.{name} must have {n} words")
        arr = getattr(c, name)
        for i, w in enumerate(words):
            arr[i] = _u64(w)
    c.cpuid.nent = _u32(req.effective_nent)
    c.cpuid.padding = _u32(req.cpuid_padding)
    ffi.memmove(raw + SIZEOF_INIT_VM_HEADER, _entries_bytes(req.entries),
                len(req.entries) * SIZEOF_CPUID_ENTRY2)
    return bytes(ffi.buffer(raw))


def unpack_init_vm(data: bytes) -> InitVm:
    """Read an init_vm buffer: the header, then min(nent, room) entries."""
    if len(data) < SIZEOF_INIT_VM_HEADER:
        raise ValueError("buffer shorter than struct kvm_tdx_init_vm")
    raw: Any = ffi.new("char[]", SIZEOF_INIT_VM_HEADER)
    ffi.memmove(raw, data[:SIZEOF_INIT_VM_HEADER], SIZEOF_INIT_VM_HEADER)
    c: Any = ffi.cast("struct kvm_tdx_init_vm *", raw)
    nent = int(c.cpuid.nent)
    entries = _entries_in(data, SIZEOF_INIT_VM_HEADER, nent)
    return InitVm(
        attributes=int(c.attributes),
        xfam=int(c.xfam),
        mrconfigid=tuple(int(c.mrconfigid[i]) for i in range(6)),
        mrowner=tuple(int(c.mrowner[i]) for i in range(6)),
        mrownerconfig=tuple(int(c.mrownerconfig[i]) for i in range(6)),
        reserved=tuple(int(c.reserved[i]) for i in range(12)),
        nent=None if nent == len(entries) else nent,
        cpuid_padding=int(c.cpuid.padding),
        entries=entries,
    )


def pack_cpuid2(entries: tuple[CpuidEntry, ...], nent: int | None = None,
                room: int | None = None) -> bytes:
    """struct kvm_cpuid2 with `room` entries of space (default: len(entries))."""
    space = len(entries) if room is None else room
    raw: Any = ffi.new("char[]", cpuid2_size(space))
    c: Any = ffi.cast("struct kvm_cpuid2 *", raw)
    c.nent = _u32(len(entries) if nent is None else nent)
    for i, e in enumerate(entries):
        _fill_entry(c.entries[i], e)
    return bytes(ffi.buffer(raw))


def unpack_cpuid2(data: bytes) -> tuple[int, tuple[CpuidEntry, ...]]:
    """(nent, the entries that fit) of a struct kvm_cpuid2 buffer."""
    raw: Any = ffi.new("char[]", SIZEOF_CPUID2)
    ffi.memmove(raw, data[:SIZEOF_CPUID2], SIZEOF_CPUID2)
    hdr: Any = ffi.cast("struct kvm_cpuid2 *", raw)
    nent = int(hdr.nent)
    return nent, _entries_in(data, SIZEOF_CPUID2, nent)


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


def errno_name(code: int) -> str:
    return _errno.errorcode.get(code, f"E{code}")

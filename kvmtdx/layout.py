"""The uapi struct layouts as pure Python: sizes, offsets and codecs read off `cdefs/`.

`cdefs/kvm_tdx.h` is the single source of the layouts.  cffi reads it for the
device layer; this module reads the same text with a small parser of its own,
so the model (which builds and reads capabilities and INIT_VM buffers) never
has to load cffi.  The layout test compiles the real uapi headers with gcc and
holds both readings to them, and `kvmtdx.uapi` checks at import that cffi and
this module agree.

The cdefs use only what the uapi kvmtdx speaks needs: uint8_t / uint32_t / uint64_t
fields, fixed arrays of them, nested structs and one trailing flexible array.  Alignment is
natural (x86-64 SysV), which is what the kernel's headers get.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvmtdx.structs import (
    KVM_MAX_CPUID_ENTRIES,
    Capabilities,
    CpuidEntry,
    EnableCap,
    InitVm,
    TdxCmd,
)

_SCALARS = {"uint8_t": 1, "uint32_t": 4, "uint64_t": 8}
_FORMAT = {1: "B", 4: "I", 8: "Q"}


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    ctype: str  # "uint8_t", "uint32_t", "uint64_t" or "struct NAME"
    count: int | None  # None: a scalar or struct; 0: a flexible array
    offset: int
    size: int  # of the whole member (0 for a flexible array)


@dataclass(frozen=True, slots=True)
class Struct:
    name: str
    fields: tuple[Field, ...]
    size: int
    align: int

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"struct {self.name} has no field {name}")


def cdefs_text() -> str:
    # Installed wheels carry the header as the kvmtdx.cdefs package; a source
    # checkout has it at the top level, next to the package.
    try:
        return resources.files("kvmtdx.cdefs").joinpath("kvm_tdx.h").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parent.parent / "cdefs" / "kvm_tdx.h").read_text()


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


_STRUCT = re.compile(r"struct\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_MEMBER = re.compile(r"^(uint8_t|uint32_t|uint64_t|struct\s+\w+)\s+(\w+)\s*(?:\[(\d*)\])?$")


def parse(text: str) -> dict[str, Struct]:
    """Every struct of a cdefs text, laid out with natural alignment."""
    structs: dict[str, Struct] = {}
    for m in _STRUCT.finditer(strip_comments(text)):
        structs[m.group(1)] = _lay_out(m.group(1), m.group(2), structs)
    return structs


def _lay_out(name: str, body: str, known: dict[str, Struct]) -> Struct:
    fields: list[Field] = []
    offset, align = 0, 1
    for decl in (d.strip() for d in body.split(";")):
        if not decl:
            continue
        m = _MEMBER.match(" ".join(decl.split()))
        if m is None:
            raise ValueError(f"struct {name}: cannot read member {decl!r}")
        ctype, fname, count_text = m.group(1), m.group(2), m.group(3)
        if ctype in _SCALARS:
            esize = ealign = _SCALARS[ctype]
        else:
            inner = known[ctype.split()[1]]
            esize, ealign = inner.size, inner.align
        count = None if count_text is None else (int(count_text) if count_text else 0)
        offset = -(-offset // ealign) * ealign
        size = esize * (1 if count is None else count)
        fields.append(Field(fname, ctype, count, offset, size))
        offset += size
        align = max(align, ealign)
    return Struct(name, tuple(fields), -(-offset // align) * align, align)


STRUCTS: dict[str, Struct] = parse(cdefs_text())


def struct_format(s: Struct) -> str:
    """A `struct` module format for a struct of integer fields and nested structs."""
    fmt, pos = "", 0
    for f in s.fields:
        if f.count == 0:
            break
        if f.offset > pos:
            fmt += f"{f.offset - pos}x"
        if f.ctype in _SCALARS:
            fmt += _FORMAT[_SCALARS[f.ctype]] * (f.count or 1)
        else:
            fmt += struct_format(STRUCTS[f.ctype.split()[1]]) * (f.count or 1)
        pos = f.offset + f.size
    return fmt + (f"{s.size - pos}x" if s.size > pos else "")


def _codec(name: str) -> struct.Struct:
    codec = struct.Struct("<" + struct_format(STRUCTS[name]))
    if codec.size != STRUCTS[name].size:
        raise RuntimeError(f"cannot express struct {name} as a struct format")
    return codec


_ENTRY = _codec("kvm_cpuid_entry2")
_CPUID2 = _codec("kvm_cpuid2")
_CMD = _codec("kvm_tdx_cmd")
_CAPS = _codec("kvm_tdx_capabilities")
_INIT_VM = _codec("kvm_tdx_init_vm")
_ENABLE_CAP = _codec("kvm_enable_cap")

if [f.name for f in STRUCTS["kvm_cpuid_entry2"].fields] != [
        "function", "index", "flags", "eax", "ebx", "ecx", "edx", "padding"]:
    raise RuntimeError("struct kvm_cpuid_entry2 fields are not in CpuidEntry's order")

SIZEOF_CPUID_ENTRY2: int = STRUCTS["kvm_cpuid_entry2"].size
SIZEOF_CPUID2: int = STRUCTS["kvm_cpuid2"].size
SIZEOF_TDX_CMD: int = STRUCTS["kvm_tdx_cmd"].size
SIZEOF_CAPS_HEADER: int = STRUCTS["kvm_tdx_capabilities"].size
SIZEOF_INIT_VM_HEADER: int = STRUCTS["kvm_tdx_init_vm"].size
SIZEOF_ENABLE_CAP: int = STRUCTS["kvm_enable_cap"].size
_PAD = STRUCTS["kvm_enable_cap"].field("pad").size
OFFSET_CAPS_NENT: int = STRUCTS["kvm_tdx_capabilities"].field("cpuid").offset
OFFSET_INIT_VM_NENT: int = STRUCTS["kvm_tdx_init_vm"].field("cpuid").offset
OFFSET_CPUID2_PADDING: int = STRUCTS["kvm_cpuid2"].field("padding").offset
# Byte ranges inside one entry, for code that compares buffers field by field.
OFFSET_ENTRY_FLAGS: int = STRUCTS["kvm_cpuid_entry2"].field("flags").offset
SIZEOF_ENTRY_FLAGS: int = STRUCTS["kvm_cpuid_entry2"].field("flags").size
OFFSET_ENTRY_PADDING: int = STRUCTS["kvm_cpuid_entry2"].field("padding").offset
SIZEOF_ENTRY_PADDING: int = STRUCTS["kvm_cpuid_entry2"].field("padding").size


def caps_size(nent: int) -> int:
    return SIZEOF_CAPS_HEADER + nent * SIZEOF_CPUID_ENTRY2


def init_vm_size(nent: int) -> int:
    return SIZEOF_INIT_VM_HEADER + nent * SIZEOF_CPUID_ENTRY2


def cpuid2_size(nent: int) -> int:
    return SIZEOF_CPUID2 + nent * SIZEOF_CPUID_ENTRY2


# ---------------------------------------------------------------------------
# Codecs between bytes and the plain dataclasses.  Values are masked to their
# field width: a request may carry anything, the wire carries what fits.

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def pack_entry(e: CpuidEntry) -> bytes:
    p = e.padding
    return _ENTRY.pack(
        e.function & _M32, e.index & _M32, e.flags & _M32, e.eax & _M32, e.ebx & _M32,
        e.ecx & _M32, e.edx & _M32, p[0] & _M32, p[1] & _M32, p[2] & _M32,
    )


def unpack_entry(data: bytes) -> CpuidEntry:
    f, i, fl, a, b, c, d, p0, p1, p2 = _ENTRY.unpack_from(data)
    return CpuidEntry(f, i, fl, a, b, c, d, (p0, p1, p2))


# Entries packed before, by identity: a request derived from another (verify's builders, a
# prober's units, a fuzzer's mutations) shares most of its entries with it.  Each entry is
# kept beside its bytes, so an id here is its own entry's for as long as it is here.
_PACKED: dict[int, tuple[CpuidEntry, bytes]] = {}
_PACKED_KEPT = 1024


def _packed(e: CpuidEntry) -> bytes:
    try:
        # Values that fit their fields (the rule) go as they are, without masking each.
        data = _ENTRY.pack(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx, *e.padding)
    except struct.error:
        data = pack_entry(e)
    if len(_PACKED) >= _PACKED_KEPT:
        _PACKED.clear()
    _PACKED[id(e)] = (e, data)
    return data


def pack_entries(entries: tuple[CpuidEntry, ...]) -> bytes:
    # A known entry comes back as (entry, bytes), an unknown one as itself.
    return b"".join([k[1] if type(k) is tuple else _packed(e) for e, k in
                     zip(entries, map(_PACKED.get, map(id, entries), entries), strict=True)])


def unpack_entries(data: bytes, header: int, nent: int) -> tuple[CpuidEntry, ...]:
    """The entries after a header: min(nent, what the buffer holds)."""
    room = max(0, (len(data) - header) // SIZEOF_CPUID_ENTRY2)
    end = header + min(nent, room) * SIZEOF_CPUID_ENTRY2
    return tuple(
        CpuidEntry(f, i, fl, a, b, c, d, (p0, p1, p2))
        for f, i, fl, a, b, c, d, p0, p1, p2 in _ENTRY.iter_unpack(data[header:end])
    )


def entry_words(data: bytes, header: int, nent: int) -> list[tuple[int, ...]]:
    """The entries after a header as raw words (function, index, flags, eax, ebx, ecx, edx,
    padding[3]): min(nent, what the buffer holds), for a reader that wants no objects."""
    room = max(0, (len(data) - header) // SIZEOF_CPUID_ENTRY2)
    end = header + min(nent, room) * SIZEOF_CPUID_ENTRY2
    return list(_ENTRY.iter_unpack(data[header:end]))


def pack_cmd(cmd: TdxCmd) -> bytes:
    return pack_cmd_words(cmd.id, cmd.flags, cmd.data, cmd.hw_error)


def pack_cmd_words(cmd_id: int, flags: int, data: int, hw_error: int) -> bytes:
    """struct kvm_tdx_cmd from its words (no TdxCmd to build for one call)."""
    return _CMD.pack(cmd_id & _M32, flags & _M32, data & _M64, hw_error & _M64)


def unpack_cmd(data: bytes) -> TdxCmd:
    i, fl, d, hw = _CMD.unpack_from(data)
    return TdxCmd(id=i, flags=fl, data=d, hw_error=hw)


def _words(words: tuple[int, ...], n: int, what: str) -> tuple[int, ...]:
    if len(words) != n:
        raise ValueError(f"{what} must have {n} words")
    return tuple(w & _M64 for w in words)


def pack_capabilities(caps: Capabilities, nent_room: int | None = None) -> bytes:
    """Bytes of a capabilities buffer; `nent_room` entries of space (default: the entries)."""
    room = len(caps.entries) if nent_room is None else nent_room
    if room < len(caps.entries):
        raise ValueError("more entries than room for them")
    header = _CAPS.pack(
        caps.supported_attrs & _M64, caps.supported_xfam & _M64,
        caps.kernel_tdvmcallinfo_1_r11 & _M64, caps.user_tdvmcallinfo_1_r11 & _M64,
        caps.kernel_tdvmcallinfo_1_r12 & _M64, caps.user_tdvmcallinfo_1_r12 & _M64,
        *_words(caps.reserved, 250, "capabilities.reserved"),
        caps.nent & _M32, caps.cpuid_padding & _M32,
    )
    tail = bytes((room - len(caps.entries)) * SIZEOF_CPUID_ENTRY2)
    return header + pack_entries(caps.entries) + tail


def unpack_capabilities(data: bytes) -> Capabilities:
    """Read a capabilities buffer: the header, then min(nent, room) entries."""
    if len(data) < SIZEOF_CAPS_HEADER:
        raise ValueError("buffer shorter than struct kvm_tdx_capabilities")
    w = _CAPS.unpack_from(data)
    nent = w[256]
    return Capabilities(
        supported_attrs=w[0], supported_xfam=w[1],
        kernel_tdvmcallinfo_1_r11=w[2], user_tdvmcallinfo_1_r11=w[3],
        kernel_tdvmcallinfo_1_r12=w[4], user_tdvmcallinfo_1_r12=w[5],
        reserved=tuple(w[6:256]), nent=nent, cpuid_padding=w[257],
        entries=unpack_entries(data, SIZEOF_CAPS_HEADER, nent),
    )


def init_vm_bytes(init_vm: InitVm) -> bytes:
    """The bytes KVM reads for a request: the struct, and for one that claims more entries
    than it carries (up to the limit KVM reads at all) zeroed room behind them, so the
    kernel reads zeros rather than whatever follows the buffer (the mirror models the
    same)."""
    data = pack_init_vm(init_vm)
    nent = init_vm.effective_nent
    if len(init_vm.entries) < nent <= KVM_MAX_CPUID_ENTRIES:
        data += bytes((nent - len(init_vm.entries)) * SIZEOF_CPUID_ENTRY2)
    return data


def pack_init_vm(req: InitVm) -> bytes:
    try:
        # Words that fit their fields (the rule) go as they are, without masking each.
        header = _INIT_VM.pack(req.attributes, req.xfam, *req.mrconfigid, *req.mrowner,
                               *req.mrownerconfig, *req.reserved, req.effective_nent,
                               req.cpuid_padding)
        if (len(req.mrconfigid), len(req.mrowner), len(req.mrownerconfig),
                len(req.reserved)) == (6, 6, 6, 12):
            return header + pack_entries(req.entries)
    except struct.error:
        pass
    header = _INIT_VM.pack(
        req.attributes & _M64, req.xfam & _M64,
        *_words(req.mrconfigid, 6, "init_vm.mrconfigid"),
        *_words(req.mrowner, 6, "init_vm.mrowner"),
        *_words(req.mrownerconfig, 6, "init_vm.mrownerconfig"),
        *_words(req.reserved, 12, "init_vm.reserved"),
        req.effective_nent & _M32, req.cpuid_padding & _M32,
    )
    return header + pack_entries(req.entries)


def init_vm_words(data: bytes) -> tuple[int, ...]:
    """struct kvm_tdx_init_vm's header as raw words: attributes, xfam, mrconfigid[6],
    mrowner[6], mrownerconfig[6], reserved[12], cpuid.nent, cpuid.padding."""
    if len(data) < SIZEOF_INIT_VM_HEADER:
        raise ValueError("buffer shorter than struct kvm_tdx_init_vm")
    return _INIT_VM.unpack_from(data)


def unpack_init_vm(data: bytes) -> InitVm:
    """Read an init_vm buffer: the header, then min(nent, room) entries."""
    if len(data) < SIZEOF_INIT_VM_HEADER:
        raise ValueError("buffer shorter than struct kvm_tdx_init_vm")
    w = _INIT_VM.unpack_from(data)
    nent = w[32]
    entries = unpack_entries(data, SIZEOF_INIT_VM_HEADER, nent)
    return InitVm(
        attributes=w[0], xfam=w[1], mrconfigid=tuple(w[2:8]), mrowner=tuple(w[8:14]),
        mrownerconfig=tuple(w[14:20]), reserved=tuple(w[20:32]),
        nent=None if nent == len(entries) else nent, cpuid_padding=w[33], entries=entries,
    )


def pack_cpuid2(entries: tuple[CpuidEntry, ...], nent: int | None = None,
                room: int | None = None) -> bytes:
    """struct kvm_cpuid2 with `room` entries of space (default: len(entries))."""
    space = len(entries) if room is None else room
    if space < len(entries):
        raise ValueError("more entries than room for them")
    header = _CPUID2.pack((len(entries) if nent is None else nent) & _M32, 0)
    return header + pack_entries(entries) + bytes((space - len(entries)) * SIZEOF_CPUID_ENTRY2)


def unpack_cpuid2_header(data: bytes) -> tuple[int, int]:
    """(nent, padding) of a struct kvm_cpuid2 header."""
    nent, padding = _CPUID2.unpack_from(data)
    return nent, padding


def unpack_cpuid2(data: bytes) -> tuple[int, tuple[CpuidEntry, ...]]:
    """(nent, the entries that fit) of a struct kvm_cpuid2 buffer."""
    nent, _padding = _CPUID2.unpack_from(data)
    return nent, unpack_entries(data, SIZEOF_CPUID2, nent)


def pack_enable_cap(cap: EnableCap) -> bytes:
    if len(cap.args) != 4 or len(cap.pad) != _PAD:
        raise ValueError(f"kvm_enable_cap takes 4 args and {_PAD} pad bytes")
    return _ENABLE_CAP.pack(cap.cap & _M32, cap.flags & _M32,
                            *(a & _M64 for a in cap.args), *cap.pad)


def unpack_enable_cap(data: bytes) -> EnableCap:
    w = _ENABLE_CAP.unpack_from(data)
    return EnableCap(cap=w[0], flags=w[1], args=(w[2], w[3], w[4], w[5]), pad=bytes(w[6:]))

"""Struct codecs: every struct built, turned into bytes and read back (hypothesis).

Both directions are checked: dataclass -> bytes -> dataclass, and arbitrary
bytes -> dataclass -> the same bytes (so no field, padding or reserved word is
dropped).  The byte layout is also held against Python's struct module, a
witness independent of cffi.  Counts that lie (nent larger or smaller than
the entries present) and non-zero padding are part of the generated input,
because kvmtdx exists to send exactly those.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from kvmtdx import layout, uapi
from kvmtdx.structs import Capabilities, CpuidEntry, InitVm, TdxCmd

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
small_u32 = st.one_of(st.just(0), st.integers(0, 300), u32)

entries_st = st.builds(
    CpuidEntry,
    function=u32, index=u32, flags=small_u32, eax=u32, ebx=u32, ecx=u32, edx=u32,
    padding=st.tuples(small_u32, small_u32, small_u32),
)
entry_lists = st.lists(entries_st, max_size=6).map(tuple)


def words(n: int, values: st.SearchStrategy[int] = u64) -> st.SearchStrategy[tuple[int, ...]]:
    return st.one_of(st.just((0,) * n), st.lists(values, min_size=n, max_size=n).map(tuple))


@given(entries_st)
def test_entry_round_trip(e: CpuidEntry) -> None:
    raw = layout.pack_entry(e)
    assert len(raw) == layout.SIZEOF_CPUID_ENTRY2 == 40
    assert raw == struct.pack("<10I", e.function, e.index, e.flags, e.eax, e.ebx, e.ecx,
                              e.edx, *e.padding)
    assert layout.unpack_entry(raw) == e


@given(st.binary(min_size=40, max_size=40))
def test_entry_bytes_round_trip(raw: bytes) -> None:
    assert layout.pack_entry(layout.unpack_entry(raw)) == raw


@given(st.builds(TdxCmd, id=small_u32, flags=small_u32, data=u64, hw_error=u64))
def test_cmd_round_trip(cmd: TdxCmd) -> None:
    raw = layout.pack_cmd(cmd)
    assert raw == struct.pack("<IIQQ", cmd.id, cmd.flags, cmd.data, cmd.hw_error)
    assert layout.unpack_cmd(raw) == cmd


@given(st.binary(min_size=24, max_size=24))
def test_cmd_bytes_round_trip(raw: bytes) -> None:
    assert layout.pack_cmd(layout.unpack_cmd(raw)) == raw


@st.composite
def capabilities(draw: st.DrawFn) -> tuple[Capabilities, int]:
    entries = draw(entry_lists)
    room = len(entries) + draw(st.integers(0, 3))
    # nent: honest, or a lie in either direction (more than room, fewer than entries).
    nent = draw(st.one_of(st.just(len(entries)), st.integers(0, room + 3), small_u32))
    caps = Capabilities(
        supported_attrs=draw(u64), supported_xfam=draw(u64),
        kernel_tdvmcallinfo_1_r11=draw(u64), user_tdvmcallinfo_1_r11=draw(u64),
        kernel_tdvmcallinfo_1_r12=draw(u64), user_tdvmcallinfo_1_r12=draw(u64),
        reserved=draw(words(250)), nent=nent, cpuid_padding=draw(small_u32),
        entries=entries,
    )
    return caps, room


@given(capabilities())
def test_capabilities_round_trip(case: tuple[Capabilities, int]) -> None:
    caps, room = case
    raw = layout.pack_capabilities(caps, nent_room=room)
    assert len(raw) == layout.caps_size(room)
    head = struct.unpack_from("<256QII", raw)
    assert head[:6] == (caps.supported_attrs, caps.supported_xfam,
                        caps.kernel_tdvmcallinfo_1_r11, caps.user_tdvmcallinfo_1_r11,
                        caps.kernel_tdvmcallinfo_1_r12, caps.user_tdvmcallinfo_1_r12)
    assert head[6:256] == caps.reserved
    assert head[256:] == (caps.nent, caps.cpuid_padding)
    back = layout.unpack_capabilities(raw)
    # What is read past the header is min(nent, room) entries: a lie cannot overrun.
    readable = min(caps.nent, room)
    padded = caps.entries + (CpuidEntry(0),) * (room - len(caps.entries))
    assert back.entries == padded[:readable]
    assert back.nent == caps.nent
    assert back.reserved == caps.reserved and back.cpuid_padding == caps.cpuid_padding
    assert back.supported_attrs == caps.supported_attrs
    assert back.user_tdvmcallinfo_1_r12 == caps.user_tdvmcallinfo_1_r12
    if caps.nent == len(caps.entries) == room:
        assert back == caps


@given(st.integers(0, 4), st.data())
def test_capabilities_bytes_round_trip(n: int, data: st.DataObject) -> None:
    size = layout.caps_size(n)
    raw = bytearray(data.draw(st.binary(min_size=size, max_size=size)))
    struct.pack_into("<I", raw, layout.OFFSET_CAPS_NENT, n)
    caps = layout.unpack_capabilities(bytes(raw))
    assert len(caps.entries) == n
    assert layout.pack_capabilities(caps) == bytes(raw)


@st.composite
def init_vms(draw: st.DrawFn) -> InitVm:
    entries = draw(entry_lists)
    nent = draw(st.one_of(st.none(), small_u32.filter(lambda v: v != len(entries))))
    return InitVm(
        attributes=draw(u64), xfam=draw(u64),
        mrconfigid=draw(words(6)), mrowner=draw(words(6)), mrownerconfig=draw(words(6)),
        reserved=draw(words(12)), nent=nent, cpuid_padding=draw(small_u32), entries=entries,
    )


@given(init_vms())
def test_init_vm_round_trip(req: InitVm) -> None:
    raw = layout.pack_init_vm(req)
    assert len(raw) == layout.init_vm_size(len(req.entries))
    head = struct.unpack_from("<32QII", raw)
    assert head[:2] == (req.attributes, req.xfam)
    assert head[2:8] == req.mrconfigid and head[8:14] == req.mrowner
    assert head[14:20] == req.mrownerconfig and head[20:32] == req.reserved
    assert head[32:] == (req.effective_nent, req.cpuid_padding)
    back = layout.unpack_init_vm(raw)
    assert back.effective_nent == req.effective_nent
    assert back.entries == req.entries[:req.effective_nent]
    if req.effective_nent >= len(req.entries):
        # nent lies upwards (or not at all): everything comes back as it was built.
        assert back == req


@given(st.integers(0, 4), st.data())
def test_init_vm_bytes_round_trip(n: int, data: st.DataObject) -> None:
    size = layout.init_vm_size(n)
    raw = bytearray(data.draw(st.binary(min_size=size, max_size=size)))
    struct.pack_into("<I", raw, layout.OFFSET_INIT_VM_NENT, n)
    req = layout.unpack_init_vm(bytes(raw))
    assert req.nent is None and len(req.entries) == n
    assert layout.pack_init_vm(req) == bytes(raw)


@given(entry_lists, st.one_of(st.none(), small_u32), st.integers(0, 3))
def test_cpuid2_round_trip(entries: tuple[CpuidEntry, ...], nent: int | None,
                           extra: int) -> None:
    room = len(entries) + extra
    raw = layout.pack_cpuid2(entries, nent=nent, room=room)
    assert len(raw) == layout.cpuid2_size(room)
    stated = len(entries) if nent is None else nent
    assert struct.unpack_from("<II", raw) == (stated, 0)
    got_nent, got = layout.unpack_cpuid2(raw)
    padded = entries + (CpuidEntry(0),) * extra
    assert got_nent == stated
    assert got == padded[:min(stated, room)]


@given(st.binary(min_size=1, max_size=300), st.data())
def test_memory_peek_poke_round_trip(payload: bytes, data: st.DataObject) -> None:
    mem = uapi.Memory(len(payload) + 8)
    off = data.draw(st.integers(0, 8))
    uapi.poke(mem.address + off, payload)
    assert uapi.peek(mem.address + off, len(payload)) == payload
    assert mem.read(off, len(payload)) == payload
    assert mem.read(0, off) == bytes(off)


@given(st.integers(0, 3), st.integers(0, 300))
def test_a_request_claiming_more_entries_gets_zeroed_room(carried: int, nent: int) -> None:
    """The bytes KVM reads: room up to the limit KVM reads at all, zeros in it."""
    req = InitVm(entries=tuple(CpuidEntry(0x80000000 + i, eax=1) for i in range(carried)),
                 nent=nent)
    data = layout.init_vm_bytes(req)
    sent = carried if not carried < nent <= 256 else nent
    assert len(data) == layout.init_vm_size(sent)
    assert data[layout.init_vm_size(carried):] == bytes(len(data) - layout.init_vm_size(carried))


def test_every_request_the_device_sends_carries_that_room() -> None:
    """verify, probe, fuzz and init-vm hand the device a request, not bytes: the room is
    the device's to add, once (the command's data is the buffer KVM read)."""
    from helpers import GPAW48, simulated

    from kvmtdx.device import Kvm

    req = InitVm(xfam=0x3, entries=(GPAW48,), nent=3)
    with Kvm(simulated("2.0", "upstream")) as kvm, kvm.create_td() as td:
        res = td.init_vm_raw(req)
    assert res.data == layout.init_vm_bytes(req) and len(res.data) == layout.init_vm_size(3)

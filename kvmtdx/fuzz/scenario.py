"""What one fuzz example sends to one TD: INIT_VM requests, KVM_TDX_CAPABILITIES calls and
the vCPU path.

Pure data.  A scenario is a short sequence of calls on one fresh TD: most are a single
INIT_VM, some are a TD's history (a refusal, then a valid request; a valid request, then
another), some ask for the capabilities with a caller's buffer of their own making, and some
end by reading the TD's CPUID through a vCPU as a VMM does (`VcpuCall`).  The
generators (`strategies`) draw scenarios, the engine runs them, `judge` holds every answer
to the mirror.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from kvmtdx import layout
from kvmtdx.model import vcpu
from kvmtdx.model.requests import Request
from kvmtdx.structs import KVM_MAX_CPUID_ENTRIES, Capabilities, CpuidEntry

HEADER_WORDS = ("supported_attrs", "supported_xfam", "kernel_tdvmcallinfo_1_r11",
                "user_tdvmcallinfo_1_r11", "kernel_tdvmcallinfo_1_r12",
                "user_tdvmcallinfo_1_r12")


@dataclass(frozen=True, slots=True)
class CapsCall:
    """One KVM_TDX_CAPABILITIES with a caller's buffer of room for `nent` entries.

    The caller leaves `header` in the six 64-bit header words (HEADER_WORDS) and the byte
    `fill` in every other byte but nent: what a kernel must leave untouched, overwrite or
    (Linux 6.16) echo shows against it.  `flags` and `hw_error` are kvm_tdx_cmd's.
    """

    nent: int
    flags: int = 0
    hw_error: int = 0
    header: tuple[int, ...] = (0,) * len(HEADER_WORDS)
    fill: int = 0

    def buffer(self) -> bytes:
        return _buffer(self)


@functools.lru_cache(maxsize=256)
def _buffer(call: CapsCall) -> bytes:
    word = int.from_bytes(bytes([call.fill]) * 8, "little")
    half = word & 0xFFFFFFFF
    room = CpuidEntry(half, half, half, half, half, half, half, (half, half, half))
    attrs, xfam, k11, u11, k12, u12 = call.header
    caps = Capabilities(attrs, xfam, k11, u11, k12, u12, reserved=(word,) * 250,
                        nent=call.nent, cpuid_padding=half, entries=(room,) * call.nent)
    return layout.pack_capabilities(caps, nent_room=call.nent)


@dataclass(frozen=True, slots=True)
class Lie:
    """One bit of the TD's CPUID told otherwise to KVM_SET_CPUID2: set (`on`) or cleared in
    the entry of (leaf, sub-leaf or none) that KVM_TDX_GET_CPUID gave."""

    leaf: int
    subleaf: int | None
    register: str
    bit: int
    on: bool

    def label(self) -> str:
        sub = "" if self.subleaf is None else f".{self.subleaf}"
        return f"0x{self.leaf:x}{sub} {self.register.upper()}[{self.bit}] " + \
            ("set" if self.on else "cleared")


@dataclass(frozen=True, slots=True)
class VcpuCall:
    """What a VMM does after INIT_VM to learn the TD's CPUID, with the caller's choices.

    KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP) unless `split_irqchip` is False (Linux 7.3 then
    refuses the vCPU), KVM_CREATE_VCPU, one KVM_TDX_GET_CPUID with room for `nent` entries
    (`fill` in every byte of the buffer but nent: what KVM leaves, writes or echoes shows)
    and, after E2BIG, another with the count KVM wrote back; with `set_cpuid2`,
    KVM_SET_CPUID2 with the TD's CPUID as read (less AMX tile data, which needs a guest FPU
    permission the process lacks), `lie` told otherwise.  Always a scenario's last call: the
    vCPU, once made, stays.
    """

    split_irqchip: bool = True
    nent: int = KVM_MAX_CPUID_ENTRIES
    fill: int = 0
    set_cpuid2: bool = False
    lie: Lie | None = None

    def buffer(self, nent: int | None = None) -> bytes:
        """The struct kvm_cpuid2 sent, with room for `nent` entries (default: the call's)."""
        room = self.nent if nent is None else nent
        byte = bytes([self.fill])
        return room.to_bytes(4, "little") + byte * (4 + room * layout.SIZEOF_CPUID_ENTRY2)

    def told(self, entries: Sequence[CpuidEntry]) -> tuple[CpuidEntry, ...]:
        """What KVM_SET_CPUID2 is handed: the TD's CPUID as read, AMX tile data left out,
        the lie told."""
        out = vcpu.without_dynamic_xsave(entries)
        lie = self.lie
        if lie is None:
            return out
        return vcpu.with_bit(out, lie.leaf, lie.subleaf, lie.register, lie.bit, lie.on)

    def words(self) -> int:
        """How far the call is from the plain one (split, room for every entry, zeros, no
        KVM_SET_CPUID2)."""
        return (not self.split_irqchip) + (self.nent != KVM_MAX_CPUID_ENTRIES) + \
            bool(self.fill) + self.set_cpuid2 + (self.lie is not None)


Step = Request | CapsCall | VcpuCall
Scenario = tuple[Step, ...]


def init_vm_steps(scenario: Sequence[Step]) -> tuple[Request, ...]:
    return tuple(s for s in scenario if isinstance(s, Request))


def size(scenario: Sequence[Step]) -> tuple[int, ...]:
    """How big a scenario is, to keep the smallest of those that show one discrepancy: fewer
    calls, then fewer CPUID entries, then fewer words set beside them."""
    entries = words = 0
    for s in scenario:
        if isinstance(s, CapsCall):
            words += bool(s.flags) + bool(s.hw_error) + any(s.header) + bool(s.fill)
            continue
        if isinstance(s, VcpuCall):
            words += s.words()
            continue
        iv = s.init_vm
        entries += len(iv.entries)
        words += sum(bool(v) for v in (s.flags, s.hw_error, iv.cpuid_padding, iv.attributes))
        words += sum(bool(w) for w in (*iv.reserved, *iv.mrconfigid, *iv.mrowner,
                                       *iv.mrownerconfig))
        words += iv.nent is not None
        words += sum(bin(r).count("1") for e in iv.entries for r in e.regs())
    return (len(scenario), entries, words)

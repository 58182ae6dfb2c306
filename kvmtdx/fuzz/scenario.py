"""What one fuzz example sends to one TD: INIT_VM requests and KVM_TDX_CAPABILITIES calls.

Pure data.  A scenario is a short sequence of calls on one fresh TD: most are a single
INIT_VM, some are a TD's history (a refusal, then a valid request; a valid request, then
another), some ask for the capabilities with a caller's buffer of their own making.  The
generators (`strategies`) draw scenarios, the engine runs them, `judge` holds every answer
to the mirror.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from kvmtdx import layout
from kvmtdx.model.requests import Request
from kvmtdx.structs import Capabilities, CpuidEntry

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


Step = Request | CapsCall
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
        iv = s.init_vm
        entries += len(iv.entries)
        words += sum(bool(v) for v in (s.flags, s.hw_error, iv.cpuid_padding, iv.attributes))
        words += sum(bool(w) for w in (*iv.reserved, *iv.mrconfigid, *iv.mrowner,
                                       *iv.mrownerconfig))
        words += iv.nent is not None
        words += sum(bin(r).count("1") for e in iv.entries for r in e.regs())
    return (len(scenario), entries, words)

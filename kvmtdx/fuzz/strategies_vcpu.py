"""Hypothesis strategies for the vCPU path a scenario sometimes ends with (scenario.VcpuCall).

What a VMM chooses on the way to the TD's CPUID: whether the irqchip is split before
KVM_CREATE_VCPU (Linux 7.3 refuses the vCPU without), the room KVM_TDX_GET_CPUID's buffer
has (room for every entry first; then around the count the mirror foresees for the valid
requests: one short, exact, one over; none; one), the byte the rest of the buffer holds,
and a KVM_SET_CPUID2 of the TD's CPUID with one bit told otherwise: a bit KVM hides but the
module takes set, or a reported one cleared.  Everything shrinks to the plain call: split,
room for all, zeros, no KVM_SET_CPUID2.

Only `kvmtdx fuzz` and the tests import this module: hypothesis is the fuzz extra.
"""

from __future__ import annotations

from hypothesis import strategies as st

from kvmtdx.fuzz.ground import Ground
from kvmtdx.fuzz.scenario import Lie, VcpuCall
from kvmtdx.structs import KVM_MAX_CPUID_ENTRIES, REGISTERS

PICK = st.sampled_from(range(720720))  # an index taken modulo a length (strategies.PICK)
SPLIT = st.sampled_from([True, True, True, False])
FILL = st.sampled_from([0, 0xA5])
SET_CPUID2 = st.sampled_from([False, True])
LIE = st.sampled_from([None, True, False])  # no lie; a hidden bit set; a reported bit cleared
# How often a scenario ends with the vCPU path: seldom enough to keep INIT_VM throughput,
# often enough that every vCPU-path bug shows within a few hundred TDs.
VCPU_CHANCE = st.sampled_from([False] * 7 + [True])


def rooms(g: Ground) -> list[int]:
    """KVM_TDX_GET_CPUID's room, the plain choice first."""
    around = [n for c in g.td_entries for n in (c - 1, c, c + 1)]
    return list(dict.fromkeys([KVM_MAX_CPUID_ENTRIES, *around, 0, 1]))


def _lie(draw: st.DrawFn, g: Ground, on: bool) -> Lie | None:
    """A bit KVM hides but the module takes (`on`), else a reported one (class 1 or 0 of
    ground.Row.mask), by row, register and bit."""
    rows_bits = g.bits[1 if on else 0]
    if not rows_bits:
        return None
    k, registers = rows_bits[draw(PICK) % len(rows_bits)]
    r, bits = registers[draw(PICK) % len(registers)]
    row = g.rows[k]
    return Lie(row.leaf, row.index if row.flags else None, REGISTERS[r],
               bits[draw(PICK) % len(bits)], on)


def vcpu_calls(g: Ground) -> st.SearchStrategy[VcpuCall]:
    room = st.sampled_from(rooms(g))

    @st.composite
    def draw_call(draw: st.DrawFn) -> VcpuCall:
        split, nent, fill = draw(SPLIT), draw(room), draw(FILL)
        if not draw(SET_CPUID2):
            return VcpuCall(split, nent, fill)
        on = draw(LIE)
        return VcpuCall(split, nent, fill, True, None if on is None else _lie(draw, g, on))

    return draw_call()

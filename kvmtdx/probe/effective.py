"""probe --effective: what the TD got of each accepted bit, read back with KVM_TDX_GET_CPUID.

An ACCEPTED INIT_VM says the kernel and the module took a bit, not that the TD has it: the
module clears some silently (a feature whose XSAVE state XFAM lacks, an allow_direct bit
the CPU lacks) and overrides others.  One TD carrying every reported accepted bit, then
one TD per hidden accepted bit, each read back through a vCPU, split "accepted" into
"accepted, present" and "accepted, cleared" by observation.  A hidden accepted bit that
is present is a leak; one that is cleared never reached the guest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kvmtdx.model.get_cpuid import entry_regs
from kvmtdx.outcome import Kind
from kvmtdx.probe.oracle import DeviceOracle
from kvmtdx.probe.result import BitClass, BitResult
from kvmtdx.probe.units import Layout, Unit
from kvmtdx.structs import REGISTERS, CpuidEntry

ACCEPTED = (BitClass.REPORTED_ACCEPTED, BitClass.HIDDEN_ACCEPTED)


def _read(oracle: DeviceOracle, layout: Layout, bits: Sequence[BitResult]
          ) -> tuple[CpuidEntry, ...] | str:
    """The TD's CPUID after a request carrying `bits`, or why there is none."""
    units = []
    for b in bits:
        pos = layout.position(b.leaf, b.subleaf)
        if pos is not None:
            units.append(Unit(((pos, b.register, 1 << b.bit),)))
    got = oracle.td_cpuid(layout.request(units, xfam=layout.caps.supported_xfam))
    if got is None:
        return "--max-tds reached"
    outcome, read = got
    if outcome.kind is not Kind.ACCEPTED or read is None:
        return f"INIT_VM {outcome.describe()}"
    if read.entries is None:
        return f"the TD's CPUID could not be read ({read.describe()})"
    return read.entries


def _mark(b: BitResult, td: Sequence[CpuidEntry], subleaf: int | None) -> BitResult:
    regs = entry_regs(td, b.leaf, subleaf)
    have = regs is not None and regs[REGISTERS.index(b.register)] >> b.bit & 1
    return replace(b, effective="present" if have else "cleared")


def observe(oracle: DeviceOracle, layout: Layout, bits: list[BitResult]
            ) -> tuple[list[BitResult], list[str]]:
    """`bits` with every accepted one marked present or cleared, and notes on what could
    not be read."""
    subleaf = {(e.function, e.index): (e.index if layout.flags[i] else None)
               for i, e in enumerate(layout.rows)}
    out = {b.key: b for b in bits}
    notes: list[str] = []
    reported = [b for b in bits if b.cls is BitClass.REPORTED_ACCEPTED]
    groups = [reported] if reported else []
    groups += [[b] for b in bits if b.cls is BitClass.HIDDEN_ACCEPTED]
    for group in groups:
        td = _read(oracle, layout, group)
        if isinstance(td, str):
            notes.append(f"--effective: {len(group)} accepted bits not read back: {td}")
            continue
        for b in group:
            out[b.key] = _mark(b, td, subleaf.get((b.leaf, b.subleaf)))
    return [out[b.key] for b in bits], notes

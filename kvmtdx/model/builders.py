"""KVM_TDX_INIT_VM requests, built in one place: the minimal request, the request with every
reported feature bit, stray entries, and the traps of KVM's CPUID lookup.

Pure code.  The mirror builds its full request here from the entries it predicts; the
conformance checks build theirs from the entries the kernel reported (when no module
profile is known), and every other request they send.  What makes a request valid (GPAW,
value registers, the module's couplings) is read from `kvmtdx.model.rules`, never
restated here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from enum import Enum

from kvmtdx.model.requests import Request
from kvmtdx.model.rules import (
    GPAW_LEAF,
    GPAW_SHIFT,
    MODULE_COUPLINGS,
    gpaw_entry,
    is_value_register,
)
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry, InitVm

# The GPAW every built request carries: the one every TDX host takes (52 needs 5-level EPT).
DEFAULT_GPAW = 48
# A leaf no TDX module lists (legacy cache descriptors): KVM must count it as a stray.
STRAY_LEAF = 0x2


def _merge(into: list[CpuidEntry], e: CpuidEntry) -> None:
    """OR `e` into the entry of the same (function, index, flags), else append it."""
    for i, o in enumerate(into):
        if (o.function, o.index, o.flags) == (e.function, e.index, e.flags):
            into[i] = replace(o, eax=o.eax | e.eax, ebx=o.ebx | e.ebx, ecx=o.ecx | e.ecx,
                              edx=o.edx | e.edx)
            return
    into.append(e)


def base_request(xfam: int, entries: Sequence[CpuidEntry] = (), *,
                 gpaw: int | None = DEFAULT_GPAW, attributes: int = 0,
                 reserved: tuple[int, ...] | None = None, cpuid_padding: int = 0,
                 nent: int | None = None, flags: int = 0, hw_error: int = 0) -> Request:
    """The minimal request KVM and the module take: attributes 0, the given XFAM (the reported
    one), a GPAW entry (`gpaw` None: none).  `entries` merge into it by (function, index,
    flags); the other arguments set the words a check wants wrong (`flags` and `hw_error`
    are kvm_tdx_cmd's)."""
    out: list[CpuidEntry] = [] if gpaw is None else [gpaw_entry(gpaw)]
    for e in entries:
        _merge(out, e)
    iv = InitVm(attributes=attributes, xfam=xfam, nent=nent, cpuid_padding=cpuid_padding,
                entries=tuple(out))
    if reserved is not None:
        iv = replace(iv, reserved=reserved)
    return Request(init_vm=iv, flags=flags, hw_error=hw_error)


def _valid_regs(e: CpuidEntry, subleaf: int | None, tsx_ctrl: bool) -> list[int]:
    """A reported entry's registers as a request may carry them all at once."""
    regs = list(e.regs())
    for i, r in enumerate(REGISTERS):
        if is_value_register(e.function, subleaf, r):
            regs[i] = 0
    if e.function == GPAW_LEAF:
        regs[0] = DEFAULT_GPAW << GPAW_SHIFT
    for c in MODULE_COUPLINGS:
        if (c.leaf, c.subleaf) == (e.function, subleaf):
            i = REGISTERS.index(c.register)
            regs[i] = c.met(regs[i], tsx_ctrl=tsx_ctrl)
    return regs


def full_request(reported: Sequence[CpuidEntry], *, attributes: int, xfam: int,
                 subleaves: Sequence[int | None] | None = None,
                 tsx_ctrl: bool = True) -> Request:
    """One request with every reported feature bit (spec section 5's first half).

    Value registers go at valid values (0, GPAW 48; a zero leaf 1 EAX and 0x1F ask the
    module for the host's F/M/S and topology) and the module's couplings are met (HLE and
    RTM together, and only with the host's TSX_CTRL).  Bits the TD's XFAM lacks state for
    stay in: the module clears them, it does not refuse them.  `subleaves` names each
    entry's module sub-leaf (None: the row has none, and its entry goes unflagged);
    without them every entry is flagged with its own index, which find() matches for that
    index alone.
    """
    subs = [e.index for e in reported] if subleaves is None else list(subleaves)
    if len(subs) != len(reported):
        raise ValueError(f"{len(subs)} sub-leaves for {len(reported)} entries")
    out: list[CpuidEntry] = []
    for e, sub in zip(reported, subs, strict=True):
        a, b, c, d = _valid_regs(e, sub, tsx_ctrl)
        flags = 0 if sub is None else FLAG_SIGNIFICANT_INDEX
        out.append(CpuidEntry(e.function, e.index, flags, a, b, c, d))
    return Request(init_vm=InitVm(attributes=attributes, xfam=xfam, entries=tuple(out)))


def strays(n: int) -> tuple[CpuidEntry, ...]:
    """`n` empty, flagged entries of a leaf no module lists: each breaks KVM's count."""
    return tuple(CpuidEntry(STRAY_LEAF, i, FLAG_SIGNIFICANT_INDEX) for i in range(n))


# ---------------------------------------------------------------------------
# The traps of KVM's CPUID lookup (spec section 4): find() takes, for a row, the first entry
# of that function that has no significant-index flag or has the row's index.


class Trap(str, Enum):
    """How a trap request places its leaf-7 entry carrying bits meant for row 7.0."""

    STEER = "steer"  # flagged fillers for every other leaf-7 row first, then the unflagged one
    MULTI = "multi"  # the unflagged entry alone: every leaf-7 row finds it
    STRAY = "stray"  # the unflagged entry counted once per leaf-7 row, strays balancing nent
    DUP_FIRST = "dup_first"  # two flagged 7.0 entries, the bits in the first
    DUP_SECOND = "dup_second"  # the same, the bits in the second

    def __str__(self) -> str:
        return self.value


# The unflagged entry's own index: one no module lists, so only find() can place it.
SMUGGLER_INDEX = 5


def leaf7_fillers(reported: Sequence[CpuidEntry]) -> tuple[CpuidEntry, ...]:
    """Flagged, empty entries for every reported leaf-7 row but 7.0, to steer find()."""
    return tuple(CpuidEntry(7, e.index, FLAG_SIGNIFICANT_INDEX)
                 for e in reported if e.function == 7 and e.index != 0)


def trap_request(trap: Trap, base: Request, reported: Sequence[CpuidEntry], *,
                 ebx: int, ecx: int) -> Request:
    """`base` (its entries kept last) with leaf-7 entries that carry `ebx`/`ecx` into row
    7.0 by way of KVM's lookup rather than by their own index."""
    smuggler = CpuidEntry(7, SMUGGLER_INDEX, 0, ebx=ebx, ecx=ecx)
    fillers = leaf7_fillers(reported)
    rest = base.init_vm.entries
    carrier = CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX, ebx=ebx, ecx=ecx)
    empty = CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX)
    entries = {
        Trap.STEER: (*fillers, smuggler, *rest),
        Trap.MULTI: (smuggler, *rest),
        Trap.STRAY: (smuggler, *rest, *strays(len(fillers))),
        Trap.DUP_FIRST: (carrier, empty, *rest),
        Trap.DUP_SECOND: (empty, carrier, *rest),
    }[trap]
    return replace(base, init_vm=replace(base.init_vm, entries=entries))

"""KVM_TDX_INIT_VM requests, built in one place: the minimal request, the request with every
reported feature bit, stray entries, and the traps of KVM's CPUID lookup.

Pure code.  The mirror builds its full request here from the entries it predicts; the
conformance checks build theirs from the entries the kernel reported (when no module
profile is known), and every other request they send.  What makes a request valid (GPAW,
value registers, the module's couplings) is read from `kvmtdx.model.rules`, never
restated here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from enum import Enum

from kvmtdx.model.requests import Request
from kvmtdx.model.rules import (
    GPAW_FIELD,
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
                 ebx: int, ecx: int, eax: int = 0, edx: int = 0) -> Request:
    """`base` (its entries kept last) with leaf-7 entries that carry the given registers into
    row 7.0 by way of KVM's lookup rather than by their own index."""
    smuggler = CpuidEntry(7, SMUGGLER_INDEX, 0, eax=eax, ebx=ebx, ecx=ecx, edx=edx)
    fillers = leaf7_fillers(reported)
    rest = base.init_vm.entries
    carrier = CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX, eax=eax, ebx=ebx, ecx=ecx, edx=edx)
    empty = CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX)
    entries = {
        Trap.STEER: (*fillers, smuggler, *rest),
        Trap.MULTI: (smuggler, *rest),
        Trap.STRAY: (smuggler, *rest, *strays(len(fillers))),
        Trap.DUP_FIRST: (carrier, empty, *rest),
        Trap.DUP_SECOND: (empty, carrier, *rest),
    }[trap]
    return replace(base, init_vm=replace(base.init_vm, entries=entries))


# ---------------------------------------------------------------------------
# Legal requests in unusual encodings (each must be ACCEPTED where its plain form is).

# kvm_cpuid_entry2.flags bits kvm_find_cpuid_entry2 never looks at
# (KVM_CPUID_FLAG_STATEFUL_FUNC, KVM_CPUID_FLAG_STATE_READ_NEXT: KVM_SET_CPUID2's).
IGNORED_FLAG_BITS = 0x6
# Indexes an entry without the significant-index flag may carry: the lookup ignores them.
IGNORED_INDEXES = (0xFFFFFFFF, 1, 0x80000000)


def _with_entries(req: Request, entries: Sequence[CpuidEntry]) -> Request:
    return replace(req, init_vm=replace(req.init_vm, entries=tuple(entries)))


def reversed_order(req: Request) -> Request:
    """The same entries, last first: find() takes each row's entry wherever it is."""
    return _with_entries(req, req.init_vm.entries[::-1])


def with_flag_bits(req: Request, bits: int = IGNORED_FLAG_BITS) -> Request:
    """Every entry with flag bits the lookup ignores set besides its own."""
    return _with_entries(req, [replace(e, flags=e.flags | bits) for e in req.init_vm.entries])


def with_ignored_indexes(req: Request) -> Request:
    """Each entry that is alone of its CPUID function made unflagged, with an index the lookup
    then ignores (a different one each): find() still lands it on its leaf's one row."""
    entries = req.init_vm.entries
    alone = [e for e in entries if sum(o.function == e.function for o in entries) == 1]
    out = []
    for e in entries:
        if e in alone:
            k = alone.index(e)
            e = replace(e, flags=e.flags & ~FLAG_SIGNIFICANT_INDEX,
                        index=IGNORED_INDEXES[k % len(IGNORED_INDEXES)])
        out.append(e)
    return _with_entries(req, out)


def _digest_words(label: str) -> tuple[int, ...]:
    d = hashlib.sha384(label.encode()).digest()
    return tuple(int.from_bytes(d[i:i + 8], "little") for i in range(0, 48, 8))


def with_measurements(req: Request) -> Request:
    """MRCONFIGID, MROWNER and MROWNERCONFIG set (SHA-384 values, as a VMM gives them):
    KVM copies them to TD_PARAMS without a look."""
    iv = replace(req.init_vm, mrconfigid=_digest_words("mrconfigid"),
                 mrowner=_digest_words("mrowner"), mrownerconfig=_digest_words("mrownerconfig"))
    return replace(req, init_vm=iv)


# Value registers as a server CPU fills them (leaf 1 EAX, the F/M/S, comes from the host):
# 64 logical processors; L1d 48K, L1i 32K, L2 2M, L3 120M; TLB sharing; an SMT and a core
# topology level (0x1F levels rising, level number = sub-leaf); 46 physical, 57 linear
# address bits.  A request sends each masked by what KVM reported for the register.
REALISTIC_VALUES: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (0x1, 0): (0, 0x00400800, 0, 0),
    (0x4, 0): (0xFC004121, 0x02C0003F, 0x0000003F, 0x00000000),
    (0x4, 1): (0xFC004122, 0x01C0003F, 0x0000003F, 0x00000000),
    (0x4, 2): (0xFC004143, 0x03C0003F, 0x000007FF, 0x00000000),
    (0x4, 3): (0xFC1FC163, 0x0380003F, 0x0001FFFF, 0x00000004),
    (0x18, 0): (0x00000008, 0, 0, 0x00004121),
    (0x18, 1): (0, 0, 0, 0x00004122),
    (0x1F, 0): (0x00000001, 0x00000002, 0x00000100, 0),
    (0x1F, 1): (0x00000007, 0x00000060, 0x00000201, 0),
    (GPAW_LEAF, 0): (0x0000392E, 0, 0, 0),
}


def realistic_values(req: Request, reported: Sequence[CpuidEntry], *, fms: int) -> Request:
    """`req` with every value register at a realistic value inside what was reported:
    leaf 1 EAX the host's F/M/S (`fms`), the others from REALISTIC_VALUES; the GPAW
    field kept."""
    have = {(e.function, e.index): e for e in reported}
    out = []
    for e in req.init_vm.entries:
        rep = have.get((e.function, e.index))
        typical = list(REALISTIC_VALUES.get((e.function, e.index), (0, 0, 0, 0)))
        if e.function == 1:
            typical[0] = fms
        for i, r in enumerate(REGISTERS):
            if rep is None or not is_value_register(e.function, e.index, r):
                continue
            v = typical[i] & rep.reg(r)
            if (e.function, r) == (GPAW_LEAF, "eax"):
                v = (v & ~GPAW_FIELD) | (e.eax & GPAW_FIELD)
            e = e.with_reg(r, v)
        out.append(e)
    return _with_entries(req, out)


def fms_entry(fms: int) -> CpuidEntry:
    """A leaf-1 entry whose F/M/S is one stepping off the host's: the TDX module refuses it
    (CPUID_CONFIG) for a TD that is not migratable, after KVM let it through."""
    return CpuidEntry(1, 0, 0, eax=fms ^ 1)


# ---------------------------------------------------------------------------
# Every row of a leaf with several sub-leaf rows, reached by the lookup rather than by index.


def multi_row_leaves(reported: Sequence[CpuidEntry]) -> dict[int, tuple[int, ...]]:
    """Leaf -> the indexes KVM reported for it, for leaves reported with several rows."""
    rows: dict[int, list[int]] = {}
    for e in reported:
        rows.setdefault(e.function, []).append(e.index)
    return {leaf: tuple(ix) for leaf, ix in rows.items() if len(ix) > 1}


def unlisted_index(indexes: Sequence[int]) -> int:
    """An index no row of the leaf has (SMUGGLER_INDEX or the first free one above)."""
    i = SMUGGLER_INDEX
    while i in indexes:
        i += 1
    return i


def steered(req: Request, reported: Sequence[CpuidEntry], leaf: int, index: int,
            regs: Sequence[int]) -> Request:
    """`req` with row (leaf, index)'s entry replaced by an unflagged entry at an unlisted index
    carrying `regs`, sent last: every other row of the leaf finds its own flagged entry
    first (an empty one is added where `req` has none), so find() lands the unflagged entry
    on that row alone and the count balances."""
    indexes = multi_row_leaves(reported).get(leaf, (index,))
    rest: list[CpuidEntry] = []
    for e in req.init_vm.entries:
        if e.function == leaf:
            if e.index == index:
                continue
            e = replace(e, flags=e.flags | FLAG_SIGNIFICANT_INDEX)
        rest.append(e)
    have = {e.index for e in rest if e.function == leaf}
    rest += [CpuidEntry(leaf, i, FLAG_SIGNIFICANT_INDEX) for i in indexes
             if i != index and i not in have]
    a, b, c, d = regs
    return _with_entries(req, (*rest, CpuidEntry(leaf, unlisted_index(indexes), 0, a, b, c, d)))

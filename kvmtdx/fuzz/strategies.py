"""Hypothesis strategies for KVM_TDX_INIT_VM requests, KVM_TDX_CAPABILITIES calls and
scenarios (a few calls on one TD, sometimes ending with the vCPU path: strategies_vcpu),
drawn from what a kernel reported (`ground.Ground`).

A request is one of the two valid requests (the minimal one, the one with every reported
bit) changed by a few operations, each on one domain of the contract:
- the lookup (kvm_find_cpuid_entry2): the significant-index flag, flag bits it ignores,
  indexes, functions, entry order, duplicates, the traps that steer an unflagged entry onto
  another row (builders.trap_request, builders.steered), strays that break or balance the
  count;
- the capabilities: a bit of a reported row and register, inside what was reported, hidden
  by KVM but taken by the module, outside what the module takes, or any;
- attributes, XFAM and GPAW over their whole domains, XFAM values the module judges whole
  (AVX-512, CET, AMX parts); value registers at realistic values, leaf 0x1F topologies
  (valid, zero, out of order, without a core level), leaf 1's F/M/S;
- the words KVM must refuse: reserved[], padding, an entry's padding, cmd.flags, hw_error,
  a lying nent (down, up with zeroed room, 256, 257, huge); the measurements it must take.
Everything shrinks toward the minimal request, fewer operations and the first choice of
each: a discrepancy comes back as a request of a few entries.

Only `kvmtdx fuzz` and the tests import this module: hypothesis is the fuzz extra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import strategies as st

from kvmtdx.fuzz import strategies_vcpu
from kvmtdx.fuzz.ground import Ground, Row
from kvmtdx.fuzz.scenario import HEADER_WORDS, CapsCall, Scenario, Step
from kvmtdx.model import builders
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import GPAW_FIELD, GPAW_LEAF, GPAW_SHIFT, bits_of, gpaw_entry
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry, InitVm

# Hypothesis draws integers with a bias to the low end (st.integers(0, 31) is 0 a quarter
# of the time); sampled_from draws its index evenly.  PICK is an index taken modulo the
# length at hand (evenly for lengths up to 16, near enough above: 720720 = lcm(1..16)).
PICK = st.sampled_from(range(720720))
BIT32 = st.sampled_from(range(32))
BIT64 = st.sampled_from(range(64))
REGISTER = st.sampled_from(range(4))
# 0 inside what was reported, 1 hidden by KVM but taken by the module, 2 outside what the
# module takes, 3 any bit (ground.Row.mask); 1, the bits the invariant is about, thrice.
BIT_CLASS = st.sampled_from([0, 1, 2, 3, 1, 1])
FLAG_BITS = st.sampled_from([2, 4, 6, 0x80000000])
INDEX = st.sampled_from([0, 1, 2, 3, 5, 0xFFFFFFFF, 0x80000000])
FUNCTION = st.sampled_from([builders.STRAY_LEAF, 0, 1, 4, 7, 0xD, 0x1E, 0x24, 0x40000000,
                            0x80000001, GPAW_LEAF])
TRAP_INDEX = st.sampled_from([0, 1, 3, 5])
GPAW = st.sampled_from([48, 52, 0, 39, 47, 49, 50, 51, 53, 57, 0xFF])
NENT = st.sampled_from(["down", "up", 0, 255, 256, 257, 1000, 0x80000000, 0xFFFFFFFF])
MEASUREMENT = st.sampled_from(["all", "mrconfigid", "mrowner", "mrownerconfig"])
FMS_OFF = st.sampled_from([1, 0x10, 0x000806F8])
# XFAM values check_xfam judges: AVX-512 with and without AVX, parts of it, CET and AMX
# halves, PT, LBR, and what a host supports whole.
XFAM_SET = st.sampled_from([0x3, 0x7, 0x23, 0x43, 0xE3, 0xE7, 0x20003, 0x40003, 0x60003,
                            0x60007, 0x803, 0x1003, 0x1803, 0x103, 0x8003, 0x2E7, 0x6DBE7])
# Leaf 0x1F sub-leaves (EAX shift, EBX count, ECX level type << 8 | level number): valid
# SMT+core, all zero (the host's), zero then set, types not rising, no core, a level number
# that is not its sub-leaf.
TOPOLOGY_LEAF = 0x1F
Level = tuple[int, int, int, int | None]
LEVEL: st.SearchStrategy[Level] = st.tuples(
    st.integers(0, 31), st.sampled_from([0, 1, 2, 0x70]), st.sampled_from([0, 1, 2, 3, 5, 6]),
    st.sampled_from([None, 0, 1, 4]))
SMT_CORE: list[Level] = [(1, 2, 1, None), (7, 0x70, 2, None)]
TOPOLOGY: st.SearchStrategy[list[Level]] = st.one_of(
    st.just(list[Level]()), st.just(SMT_CORE), st.lists(LEVEL, max_size=6))
TRAP = st.sampled_from(list(builders.Trap))
STRAYS = st.sampled_from(range(1, 3))
RESERVED_WORD = st.sampled_from(range(12))
NO_GPAW = st.sampled_from(range(6))  # 5: the GPAW entry goes
# One bit; the supported ones and one bit; the supported ones.
ATTRIBUTES = st.sampled_from(range(3))
ZERO_OR_ONE = st.sampled_from(range(2))
BOOL = st.booleans()


@dataclass
class Draft:
    """A request being changed, operation by operation."""

    entries: list[CpuidEntry]
    iv: InitVm
    flags: int = 0
    hw_error: int = 0
    words: dict[str, Any] = field(default_factory=dict)  # InitVm's word arrays, by name

    @classmethod
    def of(cls, req: Request) -> Draft:
        return cls(list(req.init_vm.entries), req.init_vm, req.flags, req.hw_error)

    def request(self) -> Request:
        iv = replace(self.iv, entries=tuple(self.entries), **self.words)
        return Request(init_vm=iv, flags=self.flags, hw_error=self.hw_error)

    def take(self, req: Request) -> None:
        self.entries = list(req.init_vm.entries)

    def entry_of(self, row: Row) -> int:
        """The position of the entry for `row` (by function and index), added if missing."""
        for i, e in enumerate(self.entries):
            if (e.function, e.index) == (row.leaf, row.index):
                return i
        self.entries.append(row.template())
        return len(self.entries) - 1

    def with_reg(self, i: int, register: int, value: int) -> None:
        self.entries[i] = self.entries[i].with_reg(REGISTERS[register], value)


Draw = st.DrawFn
Op = Callable[[Draw, Ground, Draft], None]


def _pick(draw: Draw, n: int) -> int:
    return draw(PICK) % n


def _bit_of(draw: Draw, mask: int) -> int | None:
    bits = bits_of(mask)
    return bits[_pick(draw, len(bits))] if bits else None


# ---------------------------------------------------------------------------
# The capabilities: a bit of a reported row, by class.


def _choose_bit(draw: Draw, g: Ground, *, multi: bool) -> tuple[Row, int, int] | None:
    """A class, then a row, register and bit of it (`multi`: in a row of a multi-row
    leaf)."""
    kind = draw(BIT_CLASS)
    if kind == 3:
        rows = [g.rows[k] for k in g.multi] if multi else list(g.rows)
        if not rows:
            return None
        return rows[_pick(draw, len(rows))], draw(REGISTER), draw(BIT32)
    rows_bits = (g.multi_bits if multi else g.bits)[kind]
    if not rows_bits:
        return None
    k, registers = rows_bits[_pick(draw, len(rows_bits))]
    r, bits = registers[_pick(draw, len(registers))]
    return g.rows[k], r, bits[_pick(draw, len(bits))]


def _row_bit(draw: Draw, g: Ground, d: Draft) -> None:
    chosen = _choose_bit(draw, g, multi=False)
    if chosen is None:
        return
    row, r, bit = chosen
    i = d.entry_of(row)
    d.with_reg(i, r, d.entries[i].reg(REGISTERS[r]) | 1 << bit)


def _clear(draw: Draw, g: Ground, d: Draft) -> None:
    if d.entries:
        d.with_reg(_pick(draw, len(d.entries)), draw(REGISTER), 0)


def _values(draw: Draw, g: Ground, d: Draft) -> None:
    """A row with value registers, at the realistic values verify sends (or F/M/S off)."""
    rows = [r for r in g.rows if any(r.value)]
    if rows:
        d.entry_of(rows[_pick(draw, len(rows))])
    fms = g.native_fms ^ draw(ZERO_OR_ONE)
    d.take(builders.realistic_values(d.request(), g.reported, fms=fms))


def _fms(draw: Draw, g: Ground, d: Draft) -> None:
    row = next((r for r in g.rows if r.leaf == 1), None)
    if row is not None:
        i = d.entry_of(row)
        d.with_reg(i, 0, g.native_fms ^ draw(FMS_OFF) if draw(BOOL) else g.native_fms)


# ---------------------------------------------------------------------------
# The lookup.


def _entry_op(change: Callable[[Draw, CpuidEntry], CpuidEntry]) -> Op:
    def op(draw: Draw, g: Ground, d: Draft) -> None:
        if d.entries:
            i = _pick(draw, len(d.entries))
            d.entries[i] = change(draw, d.entries[i])
    return op


_flag = _entry_op(lambda draw, e: replace(e, flags=e.flags ^ FLAG_SIGNIFICANT_INDEX))
_flag_bits = _entry_op(lambda draw, e: replace(e, flags=e.flags | draw(FLAG_BITS)))
_index = _entry_op(lambda draw, e: replace(e, index=draw(INDEX)))
_function = _entry_op(lambda draw, e: replace(e, function=draw(FUNCTION)))
_entry_padding = _entry_op(lambda draw, e: replace(e, padding=(1 << draw(BIT32), 0, 0)))


def _drop(draw: Draw, g: Ground, d: Draft) -> None:
    if d.entries:
        del d.entries[_pick(draw, len(d.entries))]


def _dup(draw: Draw, g: Ground, d: Draft) -> None:
    if d.entries:
        e = d.entries[_pick(draw, len(d.entries))]
        d.entries.insert(_pick(draw, len(d.entries) + 1), e)


def _move(draw: Draw, g: Ground, d: Draft) -> None:
    if d.entries:
        e = d.entries.pop(_pick(draw, len(d.entries)))
        d.entries.insert(_pick(draw, len(d.entries) + 1), e)


def _reverse(draw: Draw, g: Ground, d: Draft) -> None:
    d.entries.reverse()


def _flag_bits_all(draw: Draw, g: Ground, d: Draft) -> None:
    """Flag bits the lookup ignores on every entry (verify's accepting twin)."""
    d.take(builders.with_flag_bits(d.request(), draw(FLAG_BITS)))


def _ignored_indexes(draw: Draw, g: Ground, d: Draft) -> None:
    """Every entry alone of its function unflagged, at an index the lookup ignores."""
    d.take(builders.with_ignored_indexes(d.request()))


def _regs_of_class(draw: Draw, row: Row | None) -> list[int]:
    """Registers carrying one bit of a class of `row` (any bit without a row)."""
    regs = [0, 0, 0, 0]
    r, kind = draw(REGISTER), draw(BIT_CLASS)
    bit = _bit_of(draw, row.mask(r, kind) if row is not None else 0xFFFFFFFF)
    if bit is not None:
        regs[r] = 1 << bit
    return regs


def _trap(draw: Draw, g: Ground, d: Draft) -> None:
    """Bits meant for row 7.0 carried there by the lookup (spec section 4's traps)."""
    row = next((r for r in g.rows if (r.leaf, r.index) == (7, 0)), None)
    a, b, c, e = _regs_of_class(draw, row)
    trap = draw(TRAP)
    d.take(builders.trap_request(trap, d.request(), g.reported, eax=a, ebx=b, ecx=c, edx=e))


def _steer(draw: Draw, g: Ground, d: Draft) -> None:
    """A row of a multi-row leaf reached by an unflagged entry at an unlisted index, with a
    bit of a class added to what the row's entry carried."""
    chosen = _choose_bit(draw, g, multi=True)
    if chosen is None:
        return
    row, r, bit = chosen
    have = next((e for e in d.entries if (e.function, e.index) == (row.leaf, row.index)), None)
    regs = list(have.regs() if have is not None else (0, 0, 0, 0))
    regs[r] |= 1 << bit
    d.take(builders.steered(d.request(), g.reported, row.leaf, row.index, regs))


def _multi(draw: Draw, g: Ground, d: Draft) -> None:
    """An unflagged entry of a multi-row leaf: every row of it that the lookup reaches."""
    if not g.multi:
        return
    leaf = g.rows[g.multi[_pick(draw, len(g.multi))]].leaf
    a, b, c, e = _regs_of_class(draw, None) if draw(BOOL) else [0, 0, 0, 0]
    d.entries.insert(_pick(draw, len(d.entries) + 1),
                     CpuidEntry(leaf, draw(TRAP_INDEX), 0, a, b, c, e))


def _strays(draw: Draw, g: Ground, d: Draft) -> None:
    d.entries += builders.strays(draw(STRAYS))


# ---------------------------------------------------------------------------
# Attributes, XFAM, GPAW; the words KVM must refuse or take.


def _attributes(draw: Draw, g: Ground, d: Draft) -> None:
    bit = 1 << draw(BIT64)
    d.iv = replace(d.iv, attributes=(bit, g.supported_attrs | bit,
                                     g.supported_attrs)[draw(ATTRIBUTES)])


def _xfam(draw: Draw, g: Ground, d: Draft) -> None:
    d.iv = replace(d.iv, xfam=d.iv.xfam ^ 1 << draw(BIT64))


def _xfam_set(draw: Draw, g: Ground, d: Draft) -> None:
    """An XFAM value the module's check_xfam judges as a whole."""
    d.iv = replace(d.iv, xfam=draw(XFAM_SET))


def _topology(draw: Draw, g: Ground, d: Draft) -> None:
    """Leaf 0x1F's sub-leaves as one topology: the level at sub-leaf s from the list (zeros
    past it); a level number of None is the sub-leaf itself."""
    rows = [r for r in g.rows if r.leaf == TOPOLOGY_LEAF]
    levels = draw(TOPOLOGY)
    for row in rows:
        i = d.entry_of(row)
        shift, count, kind, number = levels[row.index] if row.index < len(levels) else (0,) * 4
        level = (row.index if number is None else number) if kind else 0
        d.entries[i] = replace(d.entries[i], eax=shift, ebx=count, ecx=kind << 8 | level, edx=0)


def _gpaw(draw: Draw, g: Ground, d: Draft) -> None:
    value = draw(GPAW)
    if draw(NO_GPAW) == 5:
        d.entries = [e for e in d.entries if e.function != GPAW_LEAF]
        return
    for i, e in enumerate(d.entries):
        if e.function == GPAW_LEAF:
            d.entries[i] = replace(e, eax=(e.eax & ~GPAW_FIELD) | value << GPAW_SHIFT)
            return
    d.entries.append(gpaw_entry(value))


def _reserved(draw: Draw, g: Ground, d: Draft) -> None:
    words = list(d.words.get("reserved", d.iv.reserved))
    words[draw(RESERVED_WORD)] |= 1 << draw(BIT64)
    d.words["reserved"] = tuple(words)


def _padding(draw: Draw, g: Ground, d: Draft) -> None:
    d.iv = replace(d.iv, cpuid_padding=1 << draw(BIT32))


def _measurements(draw: Draw, g: Ground, d: Draft) -> None:
    which = draw(MEASUREMENT)
    measured = builders.with_measurements(d.request()).init_vm
    for name in ("mrconfigid", "mrowner", "mrownerconfig"):
        if which in ("all", name):
            d.words[name] = getattr(measured, name)


def _cmd_flags(draw: Draw, g: Ground, d: Draft) -> None:
    d.flags = 1 << draw(BIT32)


def _hw_error(draw: Draw, g: Ground, d: Draft) -> None:
    d.hw_error = 1 << draw(BIT64)


def _nent(draw: Draw, g: Ground, d: Draft) -> None:
    lie = draw(NENT)
    n = len(d.entries)
    if lie == "down":
        nent = _pick(draw, n) if n else 0
    elif lie == "up":
        nent = n + 1 + _pick(draw, max(1, 256 - n))
    else:
        assert isinstance(lie, int)
        nent = lie
    d.iv = replace(d.iv, nent=nent)


# Each operation's name and how often it is drawn (a bit by class and the traps most).
OPERATIONS: dict[str, tuple[Op, int]] = {
    "row_bit": (_row_bit, 8), "trap": (_trap, 2), "steer": (_steer, 3),
    "multi": (_multi, 1), "strays": (_strays, 1), "flag": (_flag, 1),
    "flag_bits": (_flag_bits, 1), "flag_bits_all": (_flag_bits_all, 1),
    "ignored_indexes": (_ignored_indexes, 1), "index": (_index, 1), "function": (_function, 1),
    "drop": (_drop, 1), "dup": (_dup, 1), "move": (_move, 1), "reverse": (_reverse, 1),
    "clear": (_clear, 1), "values": (_values, 2), "fms": (_fms, 1),
    "attributes": (_attributes, 2), "xfam": (_xfam, 2), "xfam_set": (_xfam_set, 2),
    "topology": (_topology, 2), "gpaw": (_gpaw, 2),
    "reserved": (_reserved, 1), "padding": (_padding, 1), "entry_padding": (_entry_padding, 1),
    "measurements": (_measurements, 1), "flags": (_cmd_flags, 1), "hw_error": (_hw_error, 1),
    "nent": (_nent, 2),
}
OPERATION = st.sampled_from([name for name, (_, w) in OPERATIONS.items() for _ in range(w)])
OPERATION_LISTS = st.lists(OPERATION, min_size=1, max_size=4)


def requests(g: Ground) -> st.SearchStrategy[Request]:
    """KVM_TDX_INIT_VM requests on `g` (see the module's docstring)."""

    @st.composite
    def draw_request(draw: Draw) -> Request:
        d = Draft.of(g.full if draw(BOOL) else g.minimal)
        for name in draw(OPERATION_LISTS):
            OPERATIONS[name][0](draw, g, d)
        return d.request()

    return draw_request()


# ---------------------------------------------------------------------------
# KVM_TDX_CAPABILITIES and scenarios.

_PATTERN = tuple(0x0101010101010101 * (k + 1) for k in range(len(HEADER_WORDS)))
_ZERO_HEADER = (0,) * len(HEADER_WORDS)
NO_FLAGS = st.sampled_from([0, 0, 0, 1, 0x80000000])
NO_HW_ERROR = st.sampled_from([0, 0, 0, 1, 1 << 63])
HEADER = st.sampled_from([_ZERO_HEADER, _PATTERN])
FILL = st.sampled_from([0, 0xA5, 0xFF])


def caps_calls(g: Ground) -> st.SearchStrategy[CapsCall]:
    """KVM_TDX_CAPABILITIES calls: room for as many entries as were reported (the first
    choice), one fewer, none, more; the cmd words; the caller's header words and the byte in
    the rest of its buffer."""
    n = len(g.reported)
    nent = st.sampled_from(sorted({n, max(0, n - 1), 0, 1, n + 1, 64, 256},
                                  key=lambda x: (x != n, x)))
    return st.builds(CapsCall, nent, NO_FLAGS, NO_HW_ERROR, HEADER, FILL)


STEP_KIND = st.sampled_from(["init_vm", "valid", "caps"])
STEPS = st.integers(1, 3)


def scenarios(g: Ground) -> st.SearchStrategy[Scenario]:
    """One to three calls on one TD: generated requests, the valid ones, capabilities;
    sometimes followed by the vCPU path (strategies_vcpu).  Built once per ground: building
    strategies costs more than drawing from them."""
    kinds: dict[str, st.SearchStrategy[Step]] = {
        "init_vm": requests(g), "valid": st.sampled_from(g.valid), "caps": caps_calls(g)}
    vcpu = strategies_vcpu.vcpu_calls(g)

    @st.composite
    def draw_scenario(draw: Draw) -> Scenario:
        calls = tuple(draw(kinds[draw(STEP_KIND)]) for _ in range(draw(STEPS)))
        if draw(strategies_vcpu.VCPU_CHANCE):
            return (*calls, draw(vcpu))
        return calls

    return draw_scenario()

"""Hypothesis strategies for INIT_VM requests, shared by the tests that hold two readings of
the contract to one another (the mirror and the simulated host; the compiled mirror and the
straightforward one).

Requests start from the full request of a (module, host, policy) and take up to four
mutations: bits flipped, bits the module takes, denied bits, find() traps (unflagged,
duplicated, reordered entries), the verify suite's legal encodings, malformed headers,
lying nent, non-zero cmd words, XFAM values check_xfam judges, 0x1F topologies.
"""

from __future__ import annotations

import functools
from dataclasses import replace

from helpers import host_without, with_bypass
from hypothesis import strategies as st

from kvmtdx import layout
from kvmtdx.model import builders, mirror
from kvmtdx.model.policy import Policy, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, Host, ModuleProfile, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.structs import (
    FLAG_SIGNIFICANT_INDEX,
    KVM_MAX_CPUID_ENTRIES,
    REGISTERS,
    CpuidEntry,
    InitVm,
)

# A host with some features, 4-level EPT only, no TSX_CTRL and a narrow XFAM.
_PARTIAL_NATIVE = {
    (1, None): (0x000906EA, 0x00100800, 0x7FFAFBBF, 0xBFEBFBFF),
    (7, 0): (0, 0x029C6FBF, 0x40000000, 0xBC000400),
    (7, 1): (0x00000010, 0, 0, 0),
    (0x80000008, None): (0x00003027, 0x00000200, 0, 0),
}
HOSTS: dict[str, Host] = {
    "max": MAX_HOST,
    "partial": replace(MAX_HOST, name="partial", native={**MAX_HOST.native, **_PARTIAL_NATIVE},
                       kvm_xfam=0x2E7, ept_5level=False, tsx_ctrl=False),
    # Lacks an XFAM bit every module fixes to 1: KVM reports nothing (EIO).
    "no-x87": replace(MAX_HOST, name="no-x87", native={**MAX_HOST.native, **_PARTIAL_NATIVE},
                      kvm_xfam=0x2E6, ept_5level=True, tsx_ctrl=True),
    # No TSX at all (HLE and RTM absent, no TSX_CTRL): the module's final-value rule sees 0s.
    "no-tsx": host_without("no-tsx", {(7, 0): {"ebx": 1 << 4 | 1 << 11}}, tsx_ctrl=False),
}


def model(module: str, host: str) -> tuple[ModuleProfile, Host]:
    """A bundled module and one of HOSTS, by name."""
    return load_profile(module), HOSTS[host]


@functools.cache
def policy_named(name: str) -> Policy:
    return get_policy(name)


@functools.cache
def base_request(module: str, host: str, policy: str) -> Request:
    m, h = model(module, host)
    return mirror.full_request(m, h, policy_named(policy))


# Strategies are built once: constructing them inside the composite costs more
# than the simulated kernel and the mirror together.
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
bit = st.integers(0, 31)
pick = st.integers(0, 2**16)  # an index, taken modulo the length at hand
OPS = st.lists(st.sampled_from([
    "flip", "flip", "flip", "flip", "module_bit", "module_bit", "module_bit", "deny",
    "module_row", "flag", "index", "function",
    "drop", "dup", "trap", "swap", "bypass", "attributes", "xfam", "gpaw", "fms",
    "reserved", "padding", "entry_padding", "mr", "flags", "hw_error",
    "reverse", "flag_bits", "steer", "steer", "realistic", "measure",
    "xfam_set", "xfam_set", "topology", "topology",
]), max_size=4)
# Request shapes the verify suite's accepting checks send (kvmtdx.model.builders).
SHAPE_OPS = frozenset({"reverse", "flag_bits", "steer", "realistic", "measure"})
FLAG_BITS = st.sampled_from([2, 4, 6, 0x80000000])
ENTRY_OPS = frozenset({"flip", "module_bit", "deny", "module_row", "flag", "index", "function",
                       "drop", "dup", "swap", "entry_padding"})
REG = st.sampled_from(REGISTERS)
INDEX = st.sampled_from([0, 1, 2, 5, 0xFFFFFFFF])
FUNCTION = st.sampled_from([0, 1, 4, 7, 0xD, 0x1E, 0x24, 0x80000001, 0x80000008])
TRAP_INDEX = st.sampled_from([0, 1, 3, 5])
TRAP_FLAGS = st.sampled_from([0, FLAG_SIGNIFICANT_INDEX])
TSX = st.sampled_from([0, 1 << 4, 1 << 11, 1 << 4 | 1 << 11])
WAITPKG = st.sampled_from([0, 1 << 5])
ATTRIBUTES = st.one_of(st.sampled_from([0, 1 << 28, 1 << 30, 1 << 28 | 1 << 30, 1, 1 << 63]),
                       st.integers(0, 63).map(lambda b: 1 << b))
BIT64 = st.integers(0, 63)
GPAW = st.sampled_from([48, 52, 0, 39, 57, 0xFF])
LIE = st.sampled_from([None] * 8 + ["down", "up", "huge"])
HUGE = st.sampled_from([257, 1000, 0x80000000, 0xFFFFFFFF])
# XFAM values check_xfam judges: AVX-512 with and without AVX, parts of it, CET and AMX
# halves, PT, LBR, and what a host supports whole.
XFAM_SET = st.sampled_from([0x3, 0x7, 0x23, 0x43, 0xE3, 0xE7, 0x20003, 0x40003, 0x60003,
                            0x60007, 0x803, 0x1003, 0x1803, 0x103, 0x8003, 0x2E7, 0x6DBE7])
# Leaf 0x1F sub-leaves (EAX shift, EBX count, ECX level type << 8 | level number): valid
# SMT+core, all zero (the host's), zero then set, types not rising, no core, a level number
# that is not its sub-leaf (2.0 refuses it).
Level = tuple[int, int, int, int | None]
LEVEL: st.SearchStrategy[Level] = st.tuples(
    st.integers(0, 31), st.sampled_from([0, 1, 2, 0x70]), st.sampled_from([0, 1, 2, 3, 5, 6]),
    st.sampled_from([None, 0, 1, 4]))
SMT_CORE: list[Level] = [(1, 2, 1, None), (7, 0x70, 2, None)]
TOPOLOGY: st.SearchStrategy[list[Level]] = st.one_of(
    st.just(list[Level]()), st.just(SMT_CORE), st.lists(LEVEL, max_size=6))
NONZERO64 = st.integers(1, 2**64 - 1)
NONZERO32 = st.integers(1, 0xFFFFFFFF)


@st.composite
def requests(draw: st.DrawFn, module: str, host: str, policy: str) -> tuple[Request, bytes]:
    """A request and the exact bytes sent (a lying nent gets zeroed room behind it)."""
    m, h = model(module, host)
    base = base_request(module, host, policy)
    iv = base.init_vm
    entries = list(iv.entries)
    flags, hw_error = 0, 0
    for op in draw(OPS):
        if op in ENTRY_OPS and not entries:
            continue
        i = draw(pick) % max(1, len(entries))
        if op == "flip":
            r = draw(REG)
            e = entries[i]
            entries[i] = e.with_reg(r, e.reg(r) ^ 1 << draw(bit))
        elif op == "module_bit":
            # A bit the module takes in this entry's row: reported or hidden by KVM.
            e = entries[i]
            k = m.row_index(e.function, None if e.function in (1, 0xA, 0x1C, 0x19, 0x80000008)
                            else e.index)
            if k is not None:
                r = draw(REG)
                allowed = m.rows[k].module_allows()[REGISTERS.index(r)]
                bits = [b for b in range(32) if allowed >> b & 1]
                if bits:
                    entries[i] = e.with_reg(r, e.reg(r) | 1 << bits[draw(pick) % len(bits)])
        elif op == "deny":
            hit = [k for k, x in enumerate(entries) if x.function == 7]
            if hit:
                e = entries[hit[0]]
                entries[hit[0]] = replace(e, ebx=e.ebx | draw(TSX), ecx=e.ecx | draw(WAITPKG))
        elif op == "module_row":
            row = m.rows[draw(pick) % len(m.rows)]
            a, b, c, d = row.module_allows()
            entries[i] = replace(entries[i], function=row.leaf, index=row.kvm_index,
                                 eax=a, ebx=b, ecx=c, edx=d)
        elif op == "flag":
            entries[i] = replace(entries[i], flags=entries[i].flags ^ FLAG_SIGNIFICANT_INDEX)
        elif op == "index":
            entries[i] = replace(entries[i], index=draw(INDEX))
        elif op == "function":
            entries[i] = replace(entries[i], function=draw(FUNCTION))
        elif op == "drop":
            del entries[i]
        elif op == "dup":
            entries.insert(draw(pick) % (len(entries) + 1), entries[i])
        elif op == "trap":
            # An unflagged leaf 7 entry matches every leaf 7 row it reaches first.
            entries.insert(draw(pick) % (len(entries) + 1), CpuidEntry(
                function=7, index=draw(TRAP_INDEX), flags=draw(TRAP_FLAGS),
                ebx=draw(TSX), ecx=draw(WAITPKG), edx=draw(u32) & draw(u32)))
        elif op == "swap":
            j = draw(pick) % len(entries)
            entries[i], entries[j] = entries[j], entries[i]
        elif op == "bypass":
            # Spec section 4: flagged 7.1 and 7.2 first, then an unflagged index 5 with
            # WAITPKG or HLE+RTM, which lands on row 7.0 behind the denylist's back.
            entries = list(with_bypass(entries, ebx=draw(TSX), ecx=draw(WAITPKG)))
        elif op == "attributes":
            iv = replace(iv, attributes=draw(ATTRIBUTES))
        elif op == "xfam":
            iv = replace(iv, xfam=iv.xfam ^ 1 << draw(BIT64))
        elif op == "xfam_set":
            iv = replace(iv, xfam=draw(XFAM_SET))
        elif op == "topology":
            entries = _topology(entries, draw(TOPOLOGY))
        elif op == "gpaw":
            g = draw(GPAW)
            hit = [k for k, x in enumerate(entries) if x.function == 0x80000008]
            if hit:
                e = entries[hit[0]]
                entries[hit[0]] = replace(e, eax=(e.eax & ~0xFF0000) | g << 16)
        elif op == "fms":
            hit = [k for k, x in enumerate(entries) if x.function == 1]
            if hit:
                fms = (0, h.native_fms(), 0x000806F8, 0x00050654)[draw(pick) % 4]
                entries[hit[0]] = replace(entries[hit[0]], eax=fms)
        elif op == "reserved":
            words = list(iv.reserved)
            words[draw(pick) % 12] = draw(NONZERO64)
            iv = replace(iv, reserved=tuple(words))
        elif op == "padding":
            iv = replace(iv, cpuid_padding=draw(NONZERO32))
        elif op == "entry_padding":
            entries[i] = replace(entries[i], padding=(draw(u32), 0, 0))
        elif op == "mr":
            iv = replace(iv, mrowner=(draw(u64),) * 6)
        elif op in SHAPE_OPS:
            iv = replace(iv, entries=tuple(entries))
            iv = _shaped(draw, op, module, host, policy, iv)
            entries = list(iv.entries)
        elif op == "flags":
            flags = draw(NONZERO32)
        elif op == "hw_error":
            hw_error = draw(NONZERO64)
    iv = replace(iv, entries=tuple(entries))
    lie = draw(LIE)
    if lie == "down" and entries:
        iv = replace(iv, nent=draw(pick) % len(entries))
    elif lie == "up":
        iv = replace(iv, nent=len(entries) + 1 + draw(pick) % (256 - len(entries)))
    elif lie == "huge":
        iv = replace(iv, nent=draw(HUGE))
    data = layout.pack_init_vm(iv)
    if iv.nent is not None and len(entries) < iv.nent <= KVM_MAX_CPUID_ENTRIES:
        # The kernel reads nent entries; the mirror models the room as zeroed.
        data += bytes((iv.nent - len(entries)) * layout.SIZEOF_CPUID_ENTRY2)
    return Request(init_vm=iv, flags=flags, hw_error=hw_error), data


def _topology(entries: list[CpuidEntry], levels: list[Level]) -> list[CpuidEntry]:
    """`entries` with every 0x1F entry set from `levels` (sub-leaf s gets levels[s], zeros
    past the list); a level number of None is the sub-leaf itself."""
    out = []
    for e in entries:
        if e.function == 0x1F and e.index < 6:
            shift, count, kind, number = levels[e.index] if e.index < len(levels) else (0,) * 4
            level = (e.index if number is None else number) if kind else 0
            e = replace(e, eax=shift, ebx=count, ecx=kind << 8 | level, edx=0)
        out.append(e)
    return out


def _shaped(draw: st.DrawFn, op: str, module: str, host: str, policy: str,
            iv: InitVm) -> InitVm:
    """`iv` in one of the shapes verify's accepting checks send, on whatever it holds now."""
    m, h = model(module, host)
    req = Request(init_vm=iv)
    reported = mirror.reported_entries(m, h, policy_named(policy))
    if op == "reverse":
        req = builders.reversed_order(req)
    elif op == "flag_bits":
        req = builders.with_flag_bits(req, draw(FLAG_BITS))
    elif op == "realistic":
        req = builders.realistic_values(req, reported, fms=h.native_fms() ^ draw(st.integers(0, 1)))
    elif op == "measure":
        req = builders.with_measurements(req)
    else:
        rows = [(leaf, i) for leaf, ix in builders.multi_row_leaves(reported).items() for i in ix]
        if rows:
            leaf, i = rows[draw(pick) % len(rows)]
            e = next((x for x in iv.entries if (x.function, x.index) == (leaf, i)), None)
            regs = list(e.regs() if e is not None else (0, 0, 0, 0))
            r, k = draw(st.integers(0, 3)), m.row_index(leaf, i)
            if k is not None:  # a bit the module takes, reported or not
                regs[r] |= m.rows[k].module_allows()[r] & draw(u32)
            req = builders.steered(req, reported, leaf, i, regs)
    return req.init_vm


MODULE = st.sampled_from(BUNDLED_MODULES)
HOST = st.sampled_from(sorted(HOSTS))

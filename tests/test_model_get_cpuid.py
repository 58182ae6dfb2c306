"""The mirror's KVM_TDX_GET_CPUID (kvmtdx.model.get_cpuid) and the request diff (td_diff).

Linux 7.3 tdx_vcpu_get_cpuid: leaf 0 and 0x80000000 name the ranges; a leaf is read first
without a sub-leaf, then sub-leaf by sub-leaf until the module refuses; 0x80000008 EAX[23:16]
is KVM's GPAW.  TDH.MNG.RD (metadata_td.c): 1.5.x refuses a faulting entry and a leaf it
does not virtualise; 2.0 reads its fixed-0 leaves (CPUID_FIXED0_BITMAP) as zeros.
"""

from __future__ import annotations

from kvmtdx.model import mirror
from kvmtdx.model.get_cpuid import ZERO, TdCpuid, entry_regs, get_cpuid, gpaw_of, predicted
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.model.td_diff import differences, rows_of, smuggled
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, CpuidEntry, InitVm

T20, T15 = load_profile("2.0").tables, load_profile("1.5.01").tables


def values(tables: object, **over: tuple[int, int, int, int]) -> dict[tuple[int, int | None],
                                                                    tuple[int, int, int, int]]:
    """Every lookup entry of `tables` holding its leaf number in EAX (leaf 0: 0x23 as the
    module fixes it; 0x80000000: 0x80000008)."""
    out = {}
    for e in tables.lookup:  # type: ignore[attr-defined]
        eax = {0: 0x23, 0x80000000: 0x80000008}.get(e.leaf, e.leaf)
        out[e.key] = (eax, e.subleaf or 0, 0, 0)
    return out


def keys(entries: tuple[CpuidEntry, ...]) -> list[tuple[int, int | None]]:
    return [(e.function, e.index if e.flags else None) for e in entries]


def test_leaves_then_sub_leaves_until_the_module_refuses() -> None:
    got = get_cpuid(TdCpuid(T20, values(T20)), 48)
    assert got is not None
    ks = keys(got)
    assert ks[0] == (0, None) and ks[-1] == (0x80000008, None)
    # Leaf 4 has sub-leaves 0-4 in the lookup: read with the flag, in order, then stop.
    assert [k for k in ks if k[0] == 4] == [(4, s) for s in range(5)]
    assert all(e.flags == FLAG_SIGNIFICANT_INDEX for e in got if e.function == 4)
    # A leaf without sub-leaves is read without one: index 0, no flag.
    one = next(e for e in got if e.function == 1)
    assert (one.index, one.flags) == (0, 0)
    assert len(got) == len(set(ks))


def test_2_0_reads_its_fixed0_leaves_as_zeros_and_1_5_skips_what_it_lacks() -> None:
    got20 = get_cpuid(TdCpuid(T20, values(T20)), 48)
    assert got20 is not None
    # Leaf 9 (DCA) and 0x80000003-5 are in 2.0's fixed-0 bitmap, not in its lookup.
    for leaf in (9, 0x80000003, 0x80000005):
        assert entry_regs(got20, leaf, None) == ZERO
    got15 = get_cpuid(TdCpuid(T15, values(T15)), 48)
    assert got15 is not None and entry_regs(got15, 9, None) is None
    assert not any(e.function == 0x80000003 for e in got15)


def test_1_5_refuses_faulting_entries() -> None:
    faulting = frozenset(e.key for e in T15.lookup if e.faulting)
    assert faulting
    got = get_cpuid(TdCpuid(T15, values(T15), faulting), 48)
    assert got is not None
    assert not {k for k in keys(got)} & {(leaf, sub) for leaf, sub in faulting}


def test_kvm_reports_its_gpaw_and_a_refused_leaf_0_is_eio() -> None:
    for gpaw in (48, 52):
        got = get_cpuid(TdCpuid(T20, values(T20)), gpaw)
        assert got is not None and got[-1].eax >> 16 & 0xFF == gpaw
    assert gpaw_of(1) == 52 and gpaw_of(4) == 48
    no_leaf_0 = TdCpuid(T15, values(T15), frozenset({(0, None)}))
    assert get_cpuid(no_leaf_0, 48) is None


def test_the_walk_stops_at_kvm_max_cpuid_entries() -> None:
    # A maximum basic leaf of 0x7f still reads at most 256 entries; leaves past 0x7f never.
    big = {**values(T20), (0, None): (0xFFFF, 0, 0, 0)}
    got = get_cpuid(TdCpuid(T20, big), 48)
    assert got is not None and len(got) <= 256
    assert all(e.function < 0x80 or e.function >= 0x80000000 for e in got)


def test_the_prediction_of_an_accepted_request() -> None:
    m, policy = load_profile("2.0"), get_policy("upstream")
    pred = mirror.init_vm_prediction(m, MAX_HOST, policy, mirror.full_request(m, MAX_HOST,
                                                                              policy))
    got = predicted(m.tables, pred)
    assert got is not None and len(got) == 89
    # No GPAW entry: KVM refuses, there is no TD to read.
    refused = mirror.init_vm_prediction(m, MAX_HOST, policy, Request(init_vm=InitVm()))
    assert predicted(m.tables, refused) is None


def test_differences_name_each_bit_with_its_kind() -> None:
    m = load_profile("2.0")
    td = get_cpuid(TdCpuid(T20, values(T20)), 48)
    assert td is not None
    rows = rows_of(m, ())
    # Row 1: asked ECX bit 28; the TD's 1.ECX is 0 here: without a predicted change a
    # configurable bit is unexplained; bits outside the row's mask (leaf 4 EBX, the cache
    # geometry) come from the CPU.
    ask = (CpuidEntry(1, 0, 0, 0, 0, 1 << 28, 0), CpuidEntry(0x80000008, 0, 0, 48 << 16))
    diffs = {(d.leaf, d.register, d.kind) for d in differences(m, rows, ask, td)}
    assert (1, "ecx", "unexplained") in diffs and (4, "ebx", "native") in diffs
    # Without a profile nothing says why.
    caps = (CpuidEntry(1, 0, 0, 0, 0, 0xFFFFFFFF, 0),)
    assert {d.kind for d in differences(None, rows_of(None, caps), ask, td)} == {"differs"}


def test_smuggled_bits_are_requested_unreported_and_in_the_td() -> None:
    reported = (CpuidEntry(7, 0, 0, 0, 0, 0, 0),)
    request = (CpuidEntry(7, 5, 0, 0, 0, 1 << 5, 0),)  # unflagged: find() lands it on 7.0
    td = (CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX, 0, 0, 1 << 5, 0),)
    rows = rows_of(load_profile("2.0"), reported)
    assert [b.label() for b in smuggled(rows, reported, request, td)] == ["0x7.0 ECX[5] WAITPKG"]
    assert smuggled(rows, reported, request, (CpuidEntry(7, 0, 1),)) == ()

"""The TD's effective CPUID after TDH.MNG.INIT, per version, and properties of the model.

Source: intel/tdx-module src/vmm_dispatcher/api_calls/tdh_mng_init.c,
read_and_set_cpuid_configurations (the per-leaf rules named in each test), and
src/common/helpers/helpers.c for the 0x1F / 0xB topology.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from kvmtdx.model.host_files import load_host
from kvmtdx.model.rules import GPAW_FIELD
from kvmtdx.model.tdx_cpuid import Unmodelled
from kvmtdx.model.tdx_host import full_request, sampled_native
from kvmtdx.model.tdx_module import MngInitResult, kvm73_td_params, mng_init
from kvmtdx.model.tdx_module_tables import ModuleTables, Regs, load_tables

HOST = load_host()
SEPT_VE_DISABLE = 1 << 28
FULL_XFAM = 0x6DBE7
ALL = ("1.5.01", "1.5.05", "2.0.08")


def base(t: ModuleTables) -> list[Regs]:
    out = list(full_request(t, HOST))
    i = t.row_keys().index((7, 0))
    a, b, c, d = out[i]
    out[i] = (a, b & ~0x810, c & ~0x20, d)
    return out


def run(t: ModuleTables, values: list[Regs], xfam: int = FULL_XFAM,
        attributes: int = SEPT_VE_DISABLE, config_flags: int | None = None) -> MngInitResult:
    p = kvm73_td_params(t, attributes=attributes, xfam=xfam, rows=values, guest_pa_bits=48,
                        tsc_khz=2_100_000, max_vcpus=8)
    if config_flags is not None:
        p = replace(p, config_flags=config_flags)
    return mng_init(t, HOST, p)


def cpuid(version: str, **kw: int) -> dict[tuple[int, int | None], Regs]:
    t = load_tables(version)
    r = run(t, base(t), **kw)
    assert r.accepted and r.cpuid is not None, r.describe()
    return dict(r.cpuid)


def with_row(t: ModuleTables, values: list[Regs], key: tuple[int, int | None],
             regs: Regs) -> list[Regs]:
    out = list(values)
    out[t.row_keys().index(key)] = regs
    return out


@pytest.mark.parametrize("version", ALL)
def test_every_virtualised_leaf_is_reported(version: str) -> None:
    t = load_tables(version)
    c = cpuid(version)
    assert set(c) == {e.key for e in t.lookup}


@pytest.mark.parametrize("version", ALL)
def test_xsave_size_follows_xfam(version: str) -> None:
    # tdh_mng_init.c: 0xD.0 ECX = calculate_xsave_area_max_size(XFAM user bits).
    assert cpuid(version)[(0xD, 0)][2] == 0x2B00  # ends with AMX tile data at 0xB00 + 0x2000
    assert cpuid(version, xfam=0x7)[(0xD, 0)][2] == 0x340  # AVX ends at 0x240 + 0x100
    assert cpuid(version, xfam=0x3)[(0xD, 0)][2] == 576
    assert cpuid(version, xfam=0x3)[(0xD, 0)][0] & 0x4 == 0  # xfam_mask_0xd_0x0[2]


@pytest.mark.parametrize("version", ALL)
def test_leaves_gated_by_xfam_and_attributes(version: str) -> None:
    small = cpuid(version, xfam=0x3)
    full = cpuid(version)
    for key, bit in (((0x14, 0), 8), ((0x1C, None), 15), ((0x1D, 1), 17), ((0xD, 18), 18)):
        assert small[key] == (0, 0, 0, 0), key
        assert full[key] != (0, 0, 0, 0), (key, bit)
    assert full[(0xA, None)] == (0, 0, 0, 0)  # ATTRIBUTES.PERFMON is 0
    assert cpuid(version, attributes=SEPT_VE_DISABLE | 1 << 63)[(0xA, None)][0] == 0x07300805
    # 0xD.1 EAX[4] (XFD) needs an XFAM component whose XSAVE leaf says XFD faults (AMX tiles).
    assert full[(0xD, 1)][0] & 0x10 and not small[(0xD, 1)][0] & 0x10


@pytest.mark.parametrize("version", ALL)
def test_tsc_and_la_bits(version: str) -> None:
    c = cpuid(version)
    assert c[(0x15, None)] == (1, 84, 25_000_000, 0)  # fixed1 1 and 25 MHz, EBX = TSC_FREQUENCY
    assert c[(0x80000008, None)][0] & 0xFFFF == 0x3934  # 57 LA bits: the TD has LA57
    t = load_tables(version)
    v = base(t)
    a, b, cc, d = v[t.row_keys().index((7, 0))]
    no_la57 = with_row(t, v, (7, 0), (a, b, cc & ~(1 << 16), d))
    r = run(t, no_la57)
    assert r.cpuid is not None and r.cpuid[(0x80000008, None)][0] & 0xFF00 == 48 << 8


@pytest.mark.parametrize("version", ALL)
def test_monitor_gates_leaf_5(version: str) -> None:
    t = load_tables(version)
    v = base(t)
    assert cpuid(version)[(5, None)] != (0, 0, 0, 0)
    a, b, c, d = v[0]
    r = run(t, with_row(t, v, (1, None), (a, b, c & ~(1 << 3), d)))
    assert r.cpuid is not None and r.cpuid[(5, None)] == (0, 0, 0, 0)


def test_leaf_1a_zeroed_for_migratable_from_1_5_05() -> None:
    migratable = SEPT_VE_DISABLE | 1 << 29
    assert cpuid("1.5.05")[(0x1A, None)][0] == 0x40000001
    assert cpuid("1.5.05", attributes=migratable)[(0x1A, None)] == (0, 0, 0, 0)
    assert load_tables("1.5.01").lookup_at(0x1A, None) is None


def test_leaf_23_rules_per_version() -> None:
    perfmon = SEPT_VE_DISABLE | 1 << 63
    assert cpuid("1.5.01")[(0x23, 0)][0] == 0xF  # 1.5.01: no rule, native & allowed
    assert cpuid("1.5.05")[(0x23, 0)] == (0, 0, 0, 0)
    assert cpuid("1.5.05", attributes=perfmon)[(0x23, 0)][0] == 0xF
    t = load_tables("2.0.08")
    v = with_row(t, base(t), (0x23, 0), (0x3, 0, 0, 0))  # enumerate sub-leaves 0 and 1 only
    r = run(t, v, attributes=perfmon)
    assert r.cpuid is not None
    assert r.cpuid[(0x23, 1)] != (0, 0, 0, 0) and r.cpuid[(0x23, 3)] == (0, 0, 0, 0)


def test_topology_derives_leaf_b_per_version() -> None:
    # 2.0.08: 0xB.0 = SMT level, 0xB.1 = last valid level as core, 0xB.2 = end (ECX = 2).
    c20 = cpuid("2.0.08")
    assert c20[(0xB, 0)] == (1, 2, 0x100, 0)
    assert c20[(0xB, 1)] == (7, 0x70, 0x201, 0)
    assert c20[(0xB, 2)] == (0, 0, 2, 0)
    # 1.5.05 rewrites 0xB.1 on every sub-leaf it scans: the last (5, invalid) one wins.
    c15 = cpuid("1.5.05")
    assert c15[(0xB, 0)] == (1, 2, 0x100, 0)
    assert c15[(0xB, 1)] == (0, 0, 0x205, 0)


def topology_status(version: str, levels: list[Regs]) -> int:
    t = load_tables(version)
    v = base(t)
    for sub in range(6):
        v = with_row(t, v, (0x1F, sub), levels[sub] if sub < len(levels) else (0, 0, sub, 0))
    return run(t, v).status


def test_2_0_wants_level_numbers_1_5_does_not() -> None:
    # 2.0.08 check_cpuid_1f_and_compute_cpuid_0b: ECX[7:0] must equal the sub-leaf.
    unnumbered = [(7, 0x70, 0x201, 0)]  # a core level at sub-leaf 0 that says "level 1"
    assert topology_status("1.5.05", unnumbered) == 0
    assert topology_status("2.0.08", unnumbered) == 0xC000090400000000
    numbered = [(7, 0x70, 0x200, 0)]  # no SMT level is fine for both
    assert topology_status("1.5.05", numbered) == 0 == topology_status("2.0.08", numbered)
    falling = [(2, 4, 0x200, 0), (1, 2, 0x101, 0)]
    for version in ("1.5.05", "2.0.08"):
        assert topology_status(version, falling) == 0xC000090400000000


def test_2_0_wants_the_smt_level_at_sub_leaf_0() -> None:
    # After an invalid (level 0) sub-leaf the levels may rise again from 0; an SMT level
    # there is refused by 2.0.08 only (sub-leaf 3 of SMT, core, invalid, SMT).
    late_smt = [(1, 2, 0x100, 0), (7, 0x70, 0x201, 0), (0, 0, 2, 0), (1, 2, 0x103, 0)]
    assert topology_status("1.5.05", late_smt) == 0
    assert topology_status("2.0.08", late_smt) == 0xC000090400000000


def test_pa_bits_in_0x80000008() -> None:
    # 1.5.x: EAX is not configurable (KVM zeroes only 23:16); 2.0.08 takes PA bits but
    # overwrites them with the platform's MAX_PA unless CONFIG_FLAGS asks otherwise.
    for version, status in (("1.5.05", 0xC000010000000045), ("2.0.08", 0)):
        t = load_tables(version)
        v = with_row(t, base(t), (0x80000008, None), (0x2E, 0x200, 0, 0))
        r = run(t, v)
        assert r.status == status
    t = load_tables("2.0.08")
    v = with_row(t, base(t), (0x80000008, None), (0x2E, 0x200, 0, 0))
    r = run(t, v)
    assert r.cpuid is not None and r.cpuid[(0x80000008, None)][0] & 0xFF == 52
    assert any(c.kind == "overridden" and c.register == "eax" and c.mask & 0xFF
               for c in r.changes)
    r = run(t, base(t), config_flags=4 | 1 << 4)  # MAXGPA_VIRT: GPA bits = min(52, 48)
    assert r.cpuid is not None and r.cpuid[(0x80000008, None)][0] >> 16 & 0xFF == 48
    assert run(t, base(t), config_flags=4 | 3 << 3).status == 0xC000010000000042
    with pytest.raises(Unmodelled):
        run(t, v, config_flags=4 | 1 << 3)


def test_faulting_leaves_only_before_2_0() -> None:
    t15, t20 = load_tables("1.5.05"), load_tables("2.0.08")
    r15, r20 = run(t15, base(t15)), run(t20, base(t20))
    assert (6, None) in r15.faulting and (0x80000006, None) in r15.faulting
    assert r20.faulting == frozenset()


# ---------------------------------------------------------------------------
# Properties.

HLE_RTM = (1 << 4) | (1 << 11)


def random_request(data: hs.DataObject, t: ModuleTables, extra: bool) -> list[Regs]:
    """Native value fields; a random subset of every allow_direct mask (HLE = RTM); with
    `extra`, random bits outside config_direct | allow_direct in one random row (but for
    the GPAW field, which KVM zeroes)."""
    out = []
    for row, regs in zip(t.configurable, base(t), strict=True):
        picked = [r & ~ad | data.draw(hs.integers(0, 0xFFFFFFFF)) & ad & r
                  for r, ad in zip(regs, row.allow_direct, strict=True)]
        if row.key == (7, 0):
            picked[1] = picked[1] & ~HLE_RTM | (HLE_RTM if data.draw(hs.booleans()) else 0)
        out.append((picked[0], picked[1], picked[2], picked[3]))
    if extra:
        i = data.draw(hs.integers(0, len(out) - 1))
        reg = data.draw(hs.integers(0, 3))
        outside = ~t.configurable[i].allowed()[reg] & 0xFFFFFFFF
        if t.configurable[i].leaf == 0x80000008 and reg == 0:
            outside &= ~GPAW_FIELD  # KVM zeroes it in TD_PARAMS: the module never sees it
        if outside:
            bit = data.draw(hs.sampled_from([b for b in range(32) if outside >> b & 1]))
            changed = list(out[i])
            changed[reg] |= 1 << bit
            out[i] = (changed[0], changed[1], changed[2], changed[3])
    return out


def first_row_with_extra_bits(t: ModuleTables,
                              values: list[Regs]) -> tuple[int, int | None] | None:
    for e in t.lookup:
        if e.config_index is None:
            continue
        allowed = t.configurable[e.config_index].allowed()
        if any(v & ~a for v, a in zip(values[e.config_index], allowed, strict=True)):
            return e.key
    return None


@settings(max_examples=120, deadline=None)
@given(data=hs.data(), version=hs.sampled_from(ALL), extra=hs.booleans())
def test_accepted_iff_every_bit_inside_the_row_masks(data: hs.DataObject, version: str,
                                                     extra: bool) -> None:
    t = load_tables(version)
    values = random_request(data, t, extra)
    r = run(t, values)
    first = first_row_with_extra_bits(t, values)
    if first is None:
        assert r.accepted, r.describe()
    else:
        assert r.rule == "cpuid_config_mask" and (r.leaf, r.subleaf) == first
        assert r.rcx == first[0] | (0xFFFFFFFF if first[1] is None else first[1]) << 32


@settings(max_examples=120, deadline=None)
@given(data=hs.data(), version=hs.sampled_from(ALL))
def test_allow_direct_bits_come_from_the_cpu_and_the_request(data: hs.DataObject,
                                                             version: str) -> None:
    t = load_tables(version)
    native = dict(HOST.native)
    for key in ((1, None), (7, 0), (7, 1), (0x1C, None)):
        a, b, c, d = native[key]
        drop = [data.draw(hs.integers(0, 0xFFFFFFFF)) for _ in range(4)]
        if key == (7, 0):
            drop[1] = drop[1] & ~HLE_RTM | (HLE_RTM if data.draw(hs.booleans()) else 0)
        native[key] = (a & ~drop[0] if key != (1, None) else a, b & ~drop[1], c & ~drop[2],
                       d & ~drop[3])
    host = replace(HOST, native=native)
    values = random_request(data, t, extra=False)
    p = kvm73_td_params(t, attributes=SEPT_VE_DISABLE, xfam=FULL_XFAM, rows=values,
                        guest_pa_bits=48, tsc_khz=2_100_000, max_vcpus=8)
    r = mng_init(t, host, p)
    assert r.accepted and r.cpuid is not None, r.describe()
    sampled = dict(zip((e.key for e in t.lookup), sampled_native(t, host), strict=True))
    for row, asked in zip(t.configurable, values, strict=True):
        got = r.cpuid[row.key]
        for reg in range(4):
            ad = row.allow_direct[reg]
            assert got[reg] & ad & ~sampled[row.key][reg] == 0, (row.key, reg)
            assert got[reg] & ad & ~asked[reg] == 0, (row.key, reg)


@settings(max_examples=80, deadline=None)
@given(data=hs.data(), version=hs.sampled_from(ALL), xfam=hs.sampled_from(
    [0x3, 0x7, 0xE7, 0x2E7, 0x602E7, 0x6DBE7, 0x1903]))
def test_changes_explain_every_difference(data: hs.DataObject, version: str, xfam: int) -> None:
    t = load_tables(version)
    values = random_request(data, t, extra=False)
    r = run(t, values, xfam=xfam)
    assert r.accepted and r.cpuid is not None, r.describe()
    for c in r.changes:
        i = t.row_keys().index((c.leaf, c.subleaf))
        reg = ("eax", "ebx", "ecx", "edx").index(c.register)
        asked, got = values[i][reg], r.cpuid[(c.leaf, c.subleaf)][reg]
        assert c.mask and c.mask & ~(asked ^ got) == 0, c
        if c.kind == "cleared":
            assert c.mask & ~asked == 0 and c.mask & got == 0, c
        elif c.kind == "forced_1":
            assert c.mask & asked == 0 and c.mask & ~got == 0, c
    for row, requested in zip(t.configurable, values, strict=True):
        for reg in range(4):
            diff = (requested[reg] ^ r.cpuid[row.key][reg]) & row.allowed()[reg]
            covered = 0
            for c in r.changes:
                if (c.leaf, c.subleaf) == row.key and c.register == ("eax", "ebx", "ecx",
                                                                     "edx")[reg]:
                    covered |= c.mask
            assert diff & ~covered == 0, (row.key, reg)

"""Golden TDH.MNG.INIT outcomes: every case of issue 11, with the module source it comes from.

Paths are in intel/tdx-module; line numbers are of the 1.5.05 tree (commit e98d9639)
unless another version is named.  Requests start from `full_request` (everything
the module reports, native values in value fields) with KVM's denylisted bits off.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kvmtdx.model import tdx_status as st
from kvmtdx.model.host_files import load_host
from kvmtdx.model.tdx_host import HostCpu, full_request
from kvmtdx.model.tdx_module import (
    MngInitResult,
    TdParams,
    kvm73_td_params,
    mng_init,
    xfam_culprit,
)
from kvmtdx.model.tdx_module_tables import ModuleTables, Regs, load_tables

HOST = load_host()
SEPT_VE_DISABLE = 1 << 28
FULL_XFAM = 0x6DBE7  # x87 SSE AVX AVX-512 PT PKRU CET UINTR LBR AMX: all the max host has
ALL = ("1.5.01", "1.5.05", "2.0.08")
TOPOLOGY = ("1.5.05", "2.0.08")
HLE, RTM, WAITPKG = 1 << 4, 1 << 11, 1 << 5


def rows(t: ModuleTables, host: HostCpu = HOST) -> list[Regs]:
    out = list(full_request(t, host))
    i = t.row_keys().index((7, 0))
    a, b, c, d = out[i]
    out[i] = (a, b & ~(HLE | RTM), c & ~WAITPKG, d)  # KVM 7.3's denylist
    return out


def edit(t: ModuleTables, values: list[Regs], leaf: int, sub: int | None, reg: int,
         value: int) -> list[Regs]:
    i = t.row_keys().index((leaf, sub))
    regs = list(values[i])
    regs[reg] = value
    values[i] = (regs[0], regs[1], regs[2], regs[3])
    return values


def regs_of(t: ModuleTables, values: list[Regs], leaf: int, sub: int | None) -> Regs:
    return values[t.row_keys().index((leaf, sub))]


def run(version: str, values: list[Regs] | None = None, *, host: HostCpu = HOST,
        xfam: int = FULL_XFAM, attributes: int = SEPT_VE_DISABLE, **kw: Any) -> MngInitResult:
    t = load_tables(version)
    p = kvm73_td_params(t, attributes=attributes, xfam=xfam,
                        rows=values if values is not None else rows(t, host),
                        guest_pa_bits=48, tsc_khz=2_100_000, max_vcpus=8)
    return mng_init(t, host, replace(p, **kw) if kw else p)


def host_with(regs: dict[tuple[int, int | None], Regs], **flags: Any) -> HostCpu:
    native = dict(HOST.native)
    native.update(regs)
    return replace(HOST, native=native, **flags)


@pytest.mark.parametrize("version", ALL)
def test_full_kvm_request_is_accepted(version: str) -> None:
    r = run(version)
    assert r.accepted, r.describe()
    assert r.cpuid is not None


# --- XFAM gates clear silently (tdh_mng_init.c:340 apply_cpuid_xfam_masks; :315 leaf 1) -----

@pytest.mark.parametrize("version", ALL)
def test_avx512f_with_xfam_3_is_cleared_not_refused(version: str) -> None:
    t = load_tables(version)
    v = rows(t)
    avx512f = 1 << 16
    assert regs_of(t, v, 7, 0)[1] & avx512f
    r = run(version, v, xfam=0x3)
    assert r.accepted and r.cpuid is not None
    assert not r.cpuid[(7, 0)][1] & avx512f
    change = next(c for c in r.changes if c.leaf == 7 and c.register == "ebx")
    assert change.kind == "cleared" and change.mask & avx512f and "XFAM" in change.reason


@pytest.mark.parametrize("version", ALL)
def test_avx_in_leaf_1_with_xfam_3_is_cleared(version: str) -> None:
    t = load_tables(version)
    v = edit(t, rows(t), 1, None, 2, regs_of(t, rows(t), 1, None)[2] | 1 << 28)
    r = run(version, v, xfam=0x3)
    assert r.accepted and r.cpuid is not None
    assert not r.cpuid[(1, None)][2] & (1 << 28)
    assert any(c.leaf == 1 and c.register == "ecx" and c.mask & 1 << 28 and c.kind == "cleared"
               for c in r.changes)


# --- check_xfam combinations (helpers.c:1421-1445) ------------------------------------------

@pytest.mark.parametrize("version", ALL)
@pytest.mark.parametrize("xfam", [0x23, 0xE3, 0x20003, 0x803])
def test_xfam_combinations_check_xfam_refuses(version: str, xfam: int) -> None:
    r = run(version, xfam=xfam)
    assert r.status == 0xC000010000000041 and r.rule == "check_xfam"
    assert st.kvm73_outcome(r.status) == st.KvmOutcome(-22, 0xC000010000000041, False)


@pytest.mark.parametrize(("xfam", "bit"), [
    (0x23, 5), (0xE3, 5), (0x20003, 17), (0x803, 11), (0x67, 5), (0x2, 0)])
def test_the_xfam_bit_check_xfam_objects_to(xfam: int, bit: int) -> None:
    """The bit a refusal names (the status names only the operand): a lacking or missing
    fixed-1 bit, else AVX-512 without AVX, else the lowest present bit of a split group."""
    t = load_tables("2.0.08")
    assert xfam_culprit(t, HOST, xfam) == bit
    assert xfam_culprit(t, HOST, FULL_XFAM) is None


@pytest.mark.parametrize("version", ALL)
def test_xfam_bit_the_cpu_lacks_is_refused(version: str) -> None:
    no_amx = host_with({(0xD, 0): (0x2E7, 0x2B00, 0x2B00, 0)})
    assert run(version, host=no_amx).status == 0xC000010000000041


# --- 0x1F topology (helpers.c:2691 check_cpuid_1f; 2.0 check_cpuid_1f_and_compute_cpuid_0b) -

def topology(version: str, levels: list[Regs]) -> MngInitResult:
    t = load_tables(version)
    v = rows(t)
    for sub in range(6):
        v = edit(t, v, 0x1F, sub, 0, 0)
        regs = levels[sub] if sub < len(levels) else (0, 0, 0, 0)
        for reg in range(3):
            v = edit(t, v, 0x1F, sub, reg, regs[reg])
    return run(version, v)


SMT0: Regs = (1, 2, 0x100, 0)
CORE1: Regs = (7, 112, 0x201, 0)


@pytest.mark.parametrize("version", TOPOLOGY)
def test_1f_subleaf_0_zero_but_subleaf_1_set(version: str) -> None:
    r = topology(version, [(0, 0, 0, 0), CORE1])
    assert r.status == 0xC000090400000000 and r.rule.startswith("check_cpuid_1f")
    assert st.kvm73_outcome(r.status) == st.KvmOutcome(-5, 0, True)


@pytest.mark.parametrize("version", TOPOLOGY)
def test_1f_without_core_level(version: str) -> None:
    assert topology(version, [SMT0]).status == 0xC000090400000000


@pytest.mark.parametrize("version", TOPOLOGY)
def test_1f_level_types_must_rise(version: str) -> None:
    assert topology(version, [(7, 112, 0x200, 0), (1, 2, 0x101, 0)]).status == 0xC000090400000000


def test_1f_is_native_and_faulting_in_1_5_01() -> None:
    t = load_tables("1.5.01")
    assert (0x1F, 0) not in t.row_keys()  # no CPUID_CONFIG row: KVM cannot even send it
    r = run("1.5.01")
    assert r.cpuid is not None and r.cpuid[(0x1F, 1)] == HOST.native[(0x1F, 1)]
    assert (0x1F, 1) in r.faulting and (0xB, 0) not in r.cpuid


@pytest.mark.parametrize("version", TOPOLOGY)
def test_1f_all_zero_means_native_and_native_is_checked(version: str) -> None:
    r = topology(version, [])
    assert r.accepted and r.cpuid is not None
    assert r.cpuid[(0x1F, 0)][:3] == (1, 2, 0x100)  # the max host's SMT level
    bad_native = host_with({(0x1F, 0): (0x1F, 0xFFFF, 0xFFFF, 0)})
    t = load_tables(version)
    v = rows(t, bad_native)
    for sub in range(6):
        for reg in range(3):
            v = edit(t, v, 0x1F, sub, reg, 0)
    assert run(version, v, host=bad_native).status == 0xC000090400000000


# --- TSX on final values (tdh_mng_init.c:345 HLE != RTM, :352 TSX_CTRL) ----------------------

def with_tsx(version: str, bits: int) -> list[Regs]:
    t = load_tables(version)
    v = rows(t)
    return edit(t, v, 7, 0, 1, regs_of(t, v, 7, 0)[1] | bits)


@pytest.mark.parametrize("version", ALL)
def test_hle_rtm_on_a_host_without_them_is_accepted_and_cleared(version: str) -> None:
    a, b, c, d = HOST.native[(7, 0)]
    no_tsx = host_with({(7, 0): (a, b & ~(HLE | RTM), c, d)}, tsx_ctrl=False)
    r = run(version, with_tsx(version, HLE | RTM), host=no_tsx)
    assert r.accepted and r.cpuid is not None
    assert not r.cpuid[(7, 0)][1] & (HLE | RTM)
    assert any(c.mask == HLE | RTM and c.kind == "cleared" and "native bit is 0" in c.reason
               for c in r.changes)


@pytest.mark.parametrize("version", ALL)
def test_hle_rtm_without_tsx_ctrl_is_incorrect_msr_value(version: str) -> None:
    r = run(version, with_tsx(version, HLE | RTM), host=replace(HOST, tsx_ctrl=False))
    assert r.status == 0xC00009210000010A and r.rule == "tsx_ctrl" and r.rcx == 0
    assert st.status_name(r.status) == "TDX_INCORRECT_MSR_VALUE(0x10a)"
    assert st.kvm73_outcome(r.status).warns


@pytest.mark.parametrize(("status", "name"), [
    (0, "TDX_SUCCESS"),
    (0xC000010000000045, "TDX_OPERAND_INVALID(CPUID_CONFIG)"),
    (0xC000010000000042, "TDX_OPERAND_INVALID(CONFIG_FLAGS)"),
    (0xC000090400000000, "TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED"),
    (0x1234000000000000, "0x1234000000000000")])
def test_a_status_is_named_by_its_class_and_operand(status: int, name: str) -> None:
    assert st.status_name(status) == name


@pytest.mark.parametrize("version", ALL)
def test_hle_rtm_with_tsx_ctrl_is_accepted(version: str) -> None:
    r = run(version, with_tsx(version, HLE | RTM))
    assert r.accepted and r.cpuid is not None and r.cpuid[(7, 0)][1] & (HLE | RTM) == HLE | RTM


@pytest.mark.parametrize(("version", "rcx"), [("1.5.01", 0), ("1.5.05", 7), ("2.0.08", 7)])
def test_hle_without_rtm_is_cpuid_config(version: str, rcx: int) -> None:
    r = run(version, with_tsx(version, HLE))
    assert r.status == 0xC000010000000045 and r.rule == "tsx_hle_rtm" and r.rcx == rcx


@pytest.mark.parametrize("version", ALL)
def test_hle_only_on_a_host_with_rtm_only_is_accepted(version: str) -> None:
    # Final values decide: HLE asked but absent, RTM not asked: both end 0.
    a, b, c, d = HOST.native[(7, 0)]
    rtm_only = host_with({(7, 0): (a, b & ~HLE, c, d)})
    assert run(version, with_tsx(version, HLE), host=rtm_only).accepted


@pytest.mark.parametrize("version", TOPOLOGY)
def test_tsx_failure_raised_when_row_7_0_is_processed(version: str) -> None:
    t = load_tables(version)
    v = with_tsx(version, HLE)
    v = edit(t, v, 0x1F, 0, 0, 0)  # a malformed topology, checked after the CPUID pass
    v = edit(t, v, 0x1F, 0, 2, 0x500)
    assert run(version, v).rule == "tsx_hle_rtm"
    v = edit(t, v, 1, None, 0, 0x000806F4)  # leaf 1 comes before 7.0 in lookup order
    assert run(version, v).rule == "fms_native"


# --- PKS, KL and LASS are overwritten (tdh_mng_init.c:362, :384) -----------------------------

@pytest.mark.parametrize("version", ALL)
def test_pks_follows_attributes(version: str) -> None:
    pks_attr = 1 << 30
    on = run(version, attributes=SEPT_VE_DISABLE | pks_attr)
    off = run(version)
    assert on.accepted and on.cpuid is not None and on.cpuid[(7, 0)][2] >> 31 & 1
    assert off.accepted and off.cpuid is not None and not off.cpuid[(7, 0)][2] >> 31 & 1
    assert any(c.mask == 1 << 31 and c.kind == "overridden" and "PKS" in c.reason
               for c in on.changes)


@pytest.mark.parametrize("version", ALL)
def test_key_locker_is_forced_off(version: str) -> None:
    r = run(version)
    assert r.cpuid is not None and not r.cpuid[(7, 0)][2] >> 23 & 1
    assert r.cpuid[(0x19, None)] == (0, 0, 0, 0)


@pytest.mark.parametrize(("version", "lass"), [("1.5.01", 1), ("1.5.05", 0), ("2.0.08", 0)])
def test_lass_follows_attributes_from_1_5_05(version: str, lass: int) -> None:
    # 1.5.01 has no LASS rule: 7.1 EAX[6] is FIXED0 there (cpuid_lookup[6]).
    r = run(version)
    assert r.cpuid is not None
    expected = 0 if version == "1.5.01" else lass
    assert r.cpuid[(7, 1)][0] >> 6 & 1 == expected


# --- F/M/S (tdh_mng_init.c:283-310, cpuid_fms.c check_fms_config) ----------------------------

MIGRATABLE, DEBUG, PERFMON = 1 << 29, 1, 1 << 63


@pytest.mark.parametrize("version", ALL)
def test_migratable_fms_goes_through_check_fms_config(version: str) -> None:
    t = load_tables(version)
    older_step = edit(t, rows(t), 1, None, 0, 0x000806F4)
    emr = edit(t, rows(t), 1, None, 0, 0x000C06F2)  # a newer model than the SPR host
    assert run(version, older_step, attributes=SEPT_VE_DISABLE | MIGRATABLE).accepted
    assert run(version, older_step).rule == "fms_native"
    r = run(version, emr, attributes=SEPT_VE_DISABLE | MIGRATABLE)
    assert r.rule == "check_fms_config" and r.rcx == 0xFFFFFFFF00000001


@pytest.mark.parametrize("version", ALL)
@pytest.mark.parametrize("extra", [DEBUG, PERFMON])
def test_migratable_with_debug_or_perfmon_is_refused(version: str, extra: int) -> None:
    r = run(version, attributes=SEPT_VE_DISABLE | MIGRATABLE | extra)
    assert r.status == 0xC000010000000040 and r.rule == "verify_td_attributes"
    assert run(version, attributes=SEPT_VE_DISABLE | extra).accepted


@pytest.mark.parametrize(("version", "accepted"), [("1.5.01", False), ("1.5.05", False),
                                                   ("2.0.08", True)])
def test_fms_zero_is_checked_after_substitution_only_by_1_5(version: str, accepted: bool) -> None:
    # A platform stepping newer than the table's latest: 1.5.x checks the substituted
    # native F/M/S of a MIGRATABLE TD and refuses it; 2.0.08 skips the check for 0.
    _, b, c, d = HOST.native[(1, None)]
    spr_step9 = host_with({(1, None): (0x000806F9, b, c, d)})
    t = load_tables(version)
    v = edit(t, rows(t, spr_step9), 1, None, 0, 0)
    r = run(version, v, host=spr_step9, attributes=SEPT_VE_DISABLE | MIGRATABLE)
    assert r.accepted is accepted, r.describe()
    if accepted:
        assert r.cpuid is not None and r.cpuid[(1, None)][0] == 0x000806F9


# --- Row processing order: cpuid_lookup[], not CPUID_CONFIG ---------------------------------

@pytest.mark.parametrize("version", TOPOLOGY)
def test_first_failing_row_in_lookup_order_decides(version: str) -> None:
    t = load_tables(version)
    assert t.row_keys().index((0x23, 0)) < t.row_keys().index((0x1F, 0))
    v = edit(t, rows(t), 0x23, 0, 1, 1)  # 0x23.0 EBX is not configurable
    v = edit(t, v, 0x1F, 0, 3, 1)  # nor is 0x1F.0 EDX
    r = run(version, v)
    assert r.status == 0xC000010000000045 and r.rule == "cpuid_config_mask"
    assert (r.leaf, r.subleaf, r.rcx) == (0x1F, 0, 0x1F)


@pytest.mark.parametrize("version", ALL)
def test_cpuid_config_refusal_names_the_row(version: str) -> None:
    t = load_tables(version)
    r = run(version, edit(t, rows(t), 7, 2, 0, 1))
    assert r.status == 0xC000010000000045
    assert (r.leaf, r.subleaf, r.register, r.mask, r.rcx) == (7, 2, "eax", 1, 2 << 32 | 7)
    assert st.kvm73_outcome(r.status) == st.KvmOutcome(-22, 0xC000010000000045, False)


# --- TD_PARAMS fields before the CPUID pass (read_and_set_td_configurations) -----------------

@pytest.mark.parametrize(("version", "status"), [("1.5.01", 0), ("1.5.05", 0xC000010000000044),
                                                 ("2.0.08", 0)])
def test_max_vcpus_limit(version: str, status: int) -> None:
    assert run(version, max_vcpus=577).status == status
    assert run(version, max_vcpus=0).status == 0xC000010000000044


@pytest.mark.parametrize("version", ALL)
def test_config_flags_eptp_and_tsc(version: str) -> None:
    assert run(version, config_flags=1 << 5).status == 0xC000010000000042
    assert run(version, eptp_controls=0x6 | 4 << 3, config_flags=4).accepted  # 5-level, GPAW 48
    assert run(version, config_flags=4 | 1).status == 0xC000010000000043  # GPAW needs PWL 5
    no_5level = replace(HOST, ept_5level=False)
    assert run(version, host=no_5level, eptp_controls=0x6 | 4 << 3).status == 0xC000010000000043
    assert run(version, tsc_frequency=3).status == 0xC000010000000046
    assert run(version, reserved_nonzero=frozenset({"reserved_3"})).status == 0xC000010000000002


MIGRATABLE = 1 << 29


@pytest.mark.parametrize("version", ALL)
def test_l2_vms_at_most_three_and_not_with_a_migratable_td_before_2_0(version: str) -> None:
    """read_and_set_td_configurations: NUM_L2_VMS <= MAX_VMS - 1; 1.5.x's
    td_immutable_state_cross_check refuses a MIGRATABLE TD with L2 VMs (RDX)."""
    assert run(version, num_l2_vms=3).accepted
    assert run(version, num_l2_vms=4).status == 0xC000010000000047
    assert run(version, attributes=SEPT_VE_DISABLE | MIGRATABLE).accepted
    r = run(version, attributes=SEPT_VE_DISABLE | MIGRATABLE, num_l2_vms=1)
    if version == "2.0.08":
        assert r.accepted
    else:
        assert (r.status, r.rule) == (0xC000010000000002, "td_immutable_state_cross_check")


def test_attributes_fixed0_differs_per_version() -> None:
    icssd = 1 << 16
    assert run("1.5.05", attributes=SEPT_VE_DISABLE | icssd).status == 0xC000010000000040
    assert run("2.0.08", attributes=SEPT_VE_DISABLE | icssd).accepted
    assert run("2.0.08", attributes=SEPT_VE_DISABLE | icssd | PERFMON).status == \
        0xC000010000000040
    lass = 1 << 27
    assert run("1.5.01", attributes=SEPT_VE_DISABLE | lass).status == 0xC000010000000040
    assert run("1.5.05", attributes=SEPT_VE_DISABLE | lass).accepted


def test_td_params_rows_must_match_the_module() -> None:
    t = load_tables("1.5.01")
    p = TdParams(attributes=0, xfam=3, cpuid_values=((0, 0, 0, 0),) * 13)
    with pytest.raises(ValueError, match="13 CPUID values"):
        mng_init(t, HOST, p)

"""The simulated host's own TDX module (kvmtdx/sim/tdx_module.py and friends), rule by rule.

Each test names the module source it pins (intel/tdx-module: MNG = tdh_mng_init.c,
HLP = helpers.c, SYSI = tdh_sys_init.c).  The TD_PARAMS here are what KVM would
build: the module's own CPUID_CONFIG values with leaf 1 EAX 0 (native F/M/S) and
the 0x1F rows zero (the hardware's topology), unless a test says otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest

from kvmtdx.model.host_files import load_host
from kvmtdx.model.tdx_host import HostCpu
from kvmtdx.model.tdx_module_tables import load_tables
from kvmtdx.sim.tdx_cpuid import rcx_of
from kvmtdx.sim.tdx_module import MngInit, TdParams, TdxModule
from kvmtdx.sim.tdx_platform import Regs

VERSIONS = ("1.5.01", "1.5.05", "2.0.08")
TOPOLOGY_VERSIONS = ("1.5.05", "2.0.08")
OPERAND_INVALID = 0xC000010000000000
ATTRIBUTES_INVALID = OPERAND_INVALID + 64
XFAM_INVALID = OPERAND_INVALID + 65
CPUID_CONFIG_INVALID = OPERAND_INVALID + 69
LEAF_1F_FORMAT = 0xC000090400000000
TSX_WITHOUT_TSX_CTRL = 0xC000092100000000 + 0x10A
SEPT_VE_DISABLE, MIGRATABLE, PKS, PERFMON, DEBUG = 1 << 28, 1 << 29, 1 << 30, 1 << 63, 1
HLE, RTM, AVX512F = 1 << 4, 1 << 11, 1 << 16
REG = {"eax": 0, "ebx": 1, "ecx": 2, "edx": 3}

MAX = load_host("max")
NO_TSX_CTRL = replace(MAX, name="no-tsx-ctrl", tsx_ctrl=False)


def _without_tsx(host: HostCpu) -> HostCpu:
    native = dict(host.native)
    a, b, c, d = native[(7, 0)]
    native[(7, 0)] = (a, b & ~(HLE | RTM), c, d)
    return replace(host, name="no-tsx", native=native, tsx_ctrl=False)


NO_TSX = _without_tsx(MAX)


HOSTS = {h.name: h for h in (MAX, NO_TSX_CTRL, NO_TSX)}


def module(version: str, host: HostCpu = MAX) -> TdxModule:
    return _module(version, host.name) if HOSTS.get(host.name) is host else TdxModule(
        load_tables(version), host)


@functools.cache
def _module(version: str, host: str) -> TdxModule:
    return TdxModule(load_tables(version), HOSTS[host])


def base(m: TdxModule) -> list[Regs]:
    """The module's own CPUID_CONFIG values as a request; F/M/S and topology native."""
    out: list[Regs] = []
    for row in m.td_conf.cpuid_config:
        a, b, c, d = row.values
        if row.leaf == 0x1F:
            a = b = c = d = 0
        if row.leaf == 1:
            a = 0
        out.append((a, b, c, d))
    return out


def set_reg(m: TdxModule, values: list[Regs], leaf: int, sub: int | None, reg: str,
            value: int | None = None, *, set_bits: int = 0, clear: int = 0) -> list[Regs]:
    subleaf = 0xFFFFFFFF if sub is None else sub
    k = next(i for i, r in enumerate(m.td_conf.cpuid_config)
             if (r.leaf, r.subleaf) == (leaf, subleaf))
    regs = list(values[k])
    regs[REG[reg]] = (regs[REG[reg]] if value is None else value) & ~clear | set_bits
    out = list(values)
    out[k] = (regs[0], regs[1], regs[2], regs[3])
    return out


def init(m: TdxModule, values: list[Regs], attributes: int = SEPT_VE_DISABLE,
         xfam: int | None = None, **kw: int) -> MngInit:
    x = m.td_conf.xfam_fixed0 if xfam is None else xfam
    return m.mng_init(TdParams(attributes=attributes, xfam=x, cpuid_values=tuple(values), **kw))


def reg(r: MngInit, leaf: int, sub: int | None, name: str) -> int:
    return r.cpuid[(leaf, sub)][REG[name]]


# ---------------------------------------------------------------------------
# The module's own request is accepted, everywhere.


@pytest.mark.parametrize("version", VERSIONS)
def test_the_modules_own_values_are_accepted(version: str) -> None:
    m = module(version)
    r = init(m, base(m))
    assert (r.status, r.rcx) == (0, 0)
    assert len(r.cpuid) == len(load_tables(version).lookup)


# ---------------------------------------------------------------------------
# XFAM: check_xfam refuses, the XFAM masks clear silently (HLP check_xfam, MNG).


@pytest.mark.parametrize("version", VERSIONS)
def test_avx512f_without_avx512_xfam_is_accepted_and_cleared(version: str) -> None:
    m = module(version)
    values = set_reg(m, base(m), 7, 0, "ebx", set_bits=AVX512F)
    r = init(m, values, xfam=0x3)
    assert r.status == 0
    assert not reg(r, 7, 0, "ebx") & AVX512F
    # With the AVX-512 state bits the very same request keeps the bit.
    assert reg(init(m, values, xfam=0xE7), 7, 0, "ebx") & AVX512F


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("xfam", [0x23, 0xE3, 0x20003, 0x803, 0x2, 0x63])
def test_xfam_combinations_check_xfam_refuses(version: str, xfam: int) -> None:
    # 0x23/0xE3: AVX-512 without AVX; 0x63: AVX-512 bits unequal; 0x20003: AMX
    # halves; 0x803: CET halves; 0x2: x87 (fixed-1) missing.
    m = module(version)
    assert init(m, base(m), xfam=xfam).status == XFAM_INVALID


@pytest.mark.parametrize("version", VERSIONS)
def test_xfam_gated_leaves_are_zeroed_not_refused(version: str) -> None:
    m = module(version)
    r = init(m, base(m), xfam=0x3)
    assert r.status == 0
    assert r.cpuid[(0x14, 0)] == (0, 0, 0, 0)  # PT (XFAM[8])
    assert r.cpuid[(0x1C, None)] == (0, 0, 0, 0)  # LBR (XFAM[15])
    assert r.cpuid[(0x1D, 1)] == (0, 0, 0, 0)  # AMX (XFAM[18:17])
    assert r.cpuid[(0xD, 5)] == (0, 0, 0, 0)  # a state component XFAM lacks
    assert not reg(r, 1, None, "ecx") & 1 << 28  # AVX in leaf 1 ECX (XFAM[2])
    assert reg(r, 0xD, 0, "ecx") == 576  # XSAVE area: the legacy region and header only
    full = init(m, base(m))
    assert reg(full, 0xD, 0, "ecx") == MAX.cpuid(0xD, 0)[1]  # every component, as the CPU says


# ---------------------------------------------------------------------------
# Attributes (HLP verify_td_attributes).


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("attributes", [MIGRATABLE | DEBUG, MIGRATABLE | PERFMON, 1 << 1, 1 << 31])
def test_attributes_refused(version: str, attributes: int) -> None:
    m = module(version)
    assert init(m, base(m), attributes=attributes).status == ATTRIBUTES_INVALID


@pytest.mark.parametrize("version", VERSIONS)
def test_migratable_alone_or_with_sept_ve_disable_is_accepted(version: str) -> None:
    m = module(version)
    assert init(m, base(m), attributes=MIGRATABLE | SEPT_VE_DISABLE).status == 0


def test_perfmon_with_icssd_is_refused_from_2_0_only() -> None:
    assert init(module("2.0.08"), base(module("2.0.08")),
                attributes=PERFMON | 1 << 16).status == ATTRIBUTES_INVALID
    # 1.5.x has no ICSSD attribute at all: bit 16 is outside ATTRIBUTES_FIXED0.
    assert init(module("1.5.05"), base(module("1.5.05")),
                attributes=PERFMON | 1 << 16).status == ATTRIBUTES_INVALID
    assert init(module("2.0.08"), base(module("2.0.08")), attributes=PERFMON).status == 0


# ---------------------------------------------------------------------------
# F/M/S (MNG leaf 1, cpuid_fms.c check_fms_config).


@pytest.mark.parametrize("version", VERSIONS)
def test_fms_native_or_zero_for_a_non_migratable_td(version: str) -> None:
    m = module(version)
    assert init(m, set_reg(m, base(m), 1, None, "eax", 0x806F8)).status == 0
    r = init(m, set_reg(m, base(m), 1, None, "eax", 0x806F7))
    assert (r.status, r.rcx) == (CPUID_CONFIG_INVALID, rcx_of(1, None))
    assert reg(init(m, base(m)), 1, None, "eax") == 0x806F8  # 0 means the platform's


@pytest.mark.parametrize("version", VERSIONS)
def test_fms_of_a_migratable_td_is_check_fms_config(version: str) -> None:
    m = module(version)
    attrs = MIGRATABLE | SEPT_VE_DISABLE
    assert init(m, set_reg(m, base(m), 1, None, "eax", 0x806F7), attributes=attrs).status == 0
    for refused in (0x806F9, 0xC06F2, 0x906EA):  # newer stepping; a family/model not allowed
        r = init(m, set_reg(m, base(m), 1, None, "eax", refused), attributes=attrs)
        assert (r.status, r.rcx) == (CPUID_CONFIG_INVALID, rcx_of(1, None)), hex(refused)


# ---------------------------------------------------------------------------
# TSX on the final 7.0 values (MNG leaf 7.0).


@pytest.mark.parametrize("version", VERSIONS)
def test_hle_and_rtm_on_a_host_without_them_are_accepted_and_cleared(version: str) -> None:
    m = module(version, NO_TSX)
    r = init(m, set_reg(m, base(m), 7, 0, "ebx", set_bits=HLE | RTM))
    assert r.status == 0
    assert not reg(r, 7, 0, "ebx") & (HLE | RTM)


@pytest.mark.parametrize("version", VERSIONS)
def test_hle_and_rtm_without_tsx_ctrl_is_incorrect_msr_value(version: str) -> None:
    m = module(version, NO_TSX_CTRL)
    r = init(m, set_reg(m, base(m), 7, 0, "ebx", set_bits=HLE | RTM))
    assert (r.status, r.rcx) == (TSX_WITHOUT_TSX_CTRL, 0)
    assert init(m, set_reg(m, base(m), 7, 0, "ebx", clear=HLE | RTM)).status == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_hle_without_rtm_is_cpuid_config(version: str) -> None:
    m = module(version)
    r = init(m, set_reg(m, base(m), 7, 0, "ebx", set_bits=HLE, clear=RTM))
    # RCX names leaf 7 from 1.5.05 on; 1.5.01 leaves it 0.
    assert (r.status, r.rcx) == (CPUID_CONFIG_INVALID, 0 if version == "1.5.01" else 7)


# ---------------------------------------------------------------------------
# Overrides: PKS from ATTRIBUTES, no Key Locker (MNG leaf 7.0).


@pytest.mark.parametrize("version", VERSIONS)
def test_pks_is_overwritten_from_attributes(version: str) -> None:
    m = module(version)
    assert reg(init(m, base(m), attributes=PKS), 7, 0, "ecx") >> 31 == 1
    assert reg(init(m, base(m), attributes=0), 7, 0, "ecx") >> 31 == 0
    assert not reg(init(m, base(m)), 7, 0, "ecx") & 1 << 23  # KL


# ---------------------------------------------------------------------------
# Leaf 0x1F (HLP check_cpuid_1f 1.5.05, check_cpuid_1f_and_compute_cpuid_0b 2.0).


def topology(m: TdxModule, levels: list[Regs]) -> list[Regs]:
    values = base(m)
    for s, regs in enumerate(levels):
        for name, v in zip(("eax", "ebx", "ecx", "edx"), regs, strict=True):
            values = set_reg(m, values, 0x1F, s, name, v)
    return values


SMT = (1, 2, 0 | 1 << 8, 0)
CORE = (7, 0x70, 1 | 2 << 8, 0)
END = (0, 0, 2, 0)


@pytest.mark.parametrize("version", TOPOLOGY_VERSIONS)
def test_a_topology_with_an_smt_and_a_core_level_is_taken(version: str) -> None:
    m = module(version)
    r = init(m, topology(m, [SMT, CORE, END]))
    assert r.status == 0
    assert r.cpuid[(0x1F, 1)] == CORE
    assert r.cpuid[(0xB, 0)] == SMT


@pytest.mark.parametrize("version", TOPOLOGY_VERSIONS)
@pytest.mark.parametrize("levels", [
    [(0, 0, 0, 0), CORE],  # sub-leaf 0 zero, sub-leaf 1 set
    [SMT, END],  # no core level
    [CORE, SMT],  # level types not rising
    [(7, 0x70, 0 | 6 << 8, 0)],  # level type 6 (LEVEL_TYPE_MAX)
    [(1, 0, 0, 0)],  # sub-leaf 0 invalid but not all zero
])
def test_malformed_topologies_are_1f_format_unrecognized(version: str,
                                                          levels: list[Regs]) -> None:
    m = module(version)
    r = init(m, topology(m, levels))
    assert (r.status, r.rcx) == (LEAF_1F_FORMAT, 0)


def test_2_0_also_wants_level_numbers_equal_to_sub_leaves() -> None:
    bad = [SMT, (7, 0x70, 5 | 2 << 8, 0), END]
    assert init(module("2.0.08"), topology(module("2.0.08"), bad)).status == LEAF_1F_FORMAT
    assert init(module("1.5.05"), topology(module("1.5.05"), bad)).status == 0


def test_2_0_also_wants_the_smt_level_at_sub_leaf_0() -> None:
    # Past an invalid sub-leaf the levels may rise again: an SMT level at sub-leaf 3.
    late_smt = [SMT, CORE, END, (1, 2, 3 | 1 << 8, 0)]
    assert init(module("2.0.08"), topology(module("2.0.08"), late_smt)).status == \
        LEAF_1F_FORMAT
    assert init(module("1.5.05"), topology(module("1.5.05"), late_smt)).status == 0


def test_1_5_01_has_no_topology_check() -> None:
    m = module("1.5.01")
    assert init(m, base(m)).status == 0
    assert (0x1F, 0) in init(m, base(m)).faulting


def test_leaf_0b_as_each_version_derives_it() -> None:
    # 1.5.05 writes 0xB.1 on every pass, so it ends as the LAST sub-leaf scanned
    # (0x1F.5, here all zero), type forced to CORE; 2.0 takes the last VALID level.
    m5, m2 = module("1.5.05"), module("2.0.08")
    r5 = init(m5, topology(m5, [SMT, CORE, END]))
    assert r5.cpuid[(0xB, 1)] == (0, 0, 2 << 8, 0)
    # With the hardware's topology (null configuration) that is the CPU's 0x1F.5.
    assert init(m5, base(m5)).cpuid[(0xB, 1)] == (0, 0, 5 | 2 << 8, 0)
    r2 = init(m2, topology(m2, [SMT, CORE, END]))
    assert r2.cpuid[(0xB, 1)] == (7, 0x70, 1 | 2 << 8, 0)
    assert r2.cpuid[(0xB, 2)] == (0, 0, 2, 0)
    # Without an SMT level 2.0 puts the core level at 0xB.0.
    r2 = init(m2, topology(m2, [(7, 0x70, 0 | 2 << 8, 0), (0, 0, 1, 0)]))
    assert r2.cpuid[(0xB, 0)] == (7, 0x70, 0 | 2 << 8, 0)


# ---------------------------------------------------------------------------
# Lookup order, not row order, decides between two refusals.


@pytest.mark.parametrize("version", TOPOLOGY_VERSIONS)
def test_the_first_failing_entry_in_lookup_order_decides(version: str) -> None:
    m = module(version)
    # Row 0x23.0 comes before the 0x1F rows in CPUID_CONFIG, but 0x1F.0 is entry
    # 46 of cpuid_lookup and 0x23.0 entry 59: the 0x1F refusal is reported.
    values = set_reg(m, base(m), 0x23, 0, "ebx", set_bits=1 << 31)
    values = set_reg(m, values, 0x1F, 0, "edx", set_bits=1 << 31)
    r = init(m, values)
    assert (r.status, r.rcx) == (CPUID_CONFIG_INVALID, rcx_of(0x1F, 0))
    # A TSX refusal at entry 5 comes before both.
    r = init(module(version, NO_TSX_CTRL), set_reg(m, values, 7, 0, "ebx", set_bits=HLE | RTM))
    assert r.status == TSX_WITHOUT_TSX_CTRL


# ---------------------------------------------------------------------------
# TDH.SYS.INIT (SYSI check_cpuid_configurations).


def test_2_0_samples_leaf_23_as_zero_on_a_cpu_without_perfmon_ext() -> None:
    native = dict(MAX.native)
    a, b, c, d = native[(7, 1)]
    native[(7, 1)] = (a & ~(1 << 8), b, c, d)
    host = replace(MAX, name="no-perfmon-ext", native=native)
    row = next(r for r in module("2.0.08", host).td_conf.cpuid_config if r.leaf == 0x23)
    assert row.values[0] == 0
    # 1.5.05 samples it as the CPU has it.
    row = next(r for r in module("1.5.05", host).td_conf.cpuid_config if r.leaf == 0x23)
    assert row.values[0] == 0xF

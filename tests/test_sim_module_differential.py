"""Two readings of TDH.MNG.INIT held to each other: the simulated host's module
(kvmtdx/sim/tdx_module.py) against the model's (kvmtdx/model/tdx_module.py).

Both were written from the public intel/tdx-module sources, independently; they share
only the converted tables.  Random TD_PARAMS (attributes and XFAM combinations, CPUID
values inside and outside the row masks, leaf 0x1F topologies, TSX bits, F/M/S values,
config flags, EPTP, TSC and MAX_VCPUS) on hosts with and without TSX_CTRL, TSX,
LASS, PERFMON_EXT, XFD, wide PA, 5-level EPT, AVX-512 and AMX state must get the
same status, the same RCX and, on success, the same effective CPUID.

Where the two disagree and the source sides with one of them, the disagreement is
pinned below (`test_known_...`) with the source that decides it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmtdx.model import tdx_host
from kvmtdx.model import tdx_module as model
from kvmtdx.model.host_files import load_host
from kvmtdx.model.tdx_cpuid import Unmodelled as ModelUnmodelled
from kvmtdx.model.tdx_host import HostCpu
from kvmtdx.model.tdx_module_tables import load_tables
from kvmtdx.sim.tdx_cpuid import Unmodelled
from kvmtdx.sim.tdx_module import TdParams, TdxModule
from kvmtdx.sim.tdx_platform import Regs

VERSIONS = ("1.5.01", "1.5.05", "2.0.08")
MAX = load_host("max")


def _edit(host: HostCpu, name: str, key: tuple[int, int | None], reg: int, clear: int = 0,
          value: int | None = None, tsx_ctrl: bool = True, ept_5level: bool = True) -> HostCpu:
    native = dict(host.native)
    regs = list(native[key])
    regs[reg] = (regs[reg] if value is None else value) & ~clear
    native[key] = (regs[0], regs[1], regs[2], regs[3])
    return replace(host, name=name, native=native, tsx_ctrl=tsx_ctrl, ept_5level=ept_5level)


TSX = 1 << 4 | 1 << 11
HOSTS: tuple[HostCpu, ...] = (
    MAX,
    replace(MAX, name="no-tsx-ctrl", tsx_ctrl=False),
    _edit(MAX, "no-tsx", (7, 0), 1, clear=TSX, tsx_ctrl=False),
    _edit(MAX, "no-tsx-with-ctrl", (7, 0), 1, clear=TSX),
    _edit(MAX, "no-lass", (7, 1), 0, clear=1 << 6),
    _edit(MAX, "no-perfmon-ext", (7, 1), 0, clear=1 << 8),
    _edit(MAX, "pa-46-4-level", (0x80000008, None), 0, value=0x3000 | 46, ept_5level=False),
    _edit(MAX, "pa-46", (0x80000008, None), 0, value=0x3000 | 46),
    _edit(MAX, "no-avx512-state", (0xD, 0), 0, clear=0xE0),
    _edit(MAX, "no-amx-state", (0xD, 0), 0, clear=0x60000),
    _edit(MAX, "no-xfd", (0xD, 1), 0, clear=1 << 4),
    _edit(MAX, "no-cet-state", (0xD, 1), 2, clear=0x1800),
    replace(MAX, name="no-tdx-io", tdx_io=False),
)
MODULES = {(v, h.name): (load_tables(v), h, TdxModule(load_tables(v), h))
           for v in VERSIONS for h in HOSTS}

ATTRIBUTE_BITS = (0, 6, 16, 27, 28, 29, 30, 62, 63)
XFAM_GROUPS = (1 << 2, 7 << 5, 1 << 8, 1 << 9, 3 << 11, 1 << 14, 1 << 15, 3 << 17)
TOPOLOGIES: tuple[list[int], ...] = (
    [1, 2], [2], [1, 2, 3], [1, 3], [2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 0, 3], [2, 1], [0, 2],
    [1, 1, 2], [1, 2, 6], [3], [1], [])
FMS = (0, 0, 0, 0x806F8, 0x806F7, 0x806F9, 0xC06F2, 0x906EA, 0xA06D0)


def _attributes(r: random.Random) -> int:
    a = 1 << 28
    if r.random() < 0.5:
        a = r.choice((0, 1 << 28, 1 << 30, 1 << 63, 1 << 29 | 1 << 28, 1 << 27, 1 << 62))
    if r.random() < 0.15:
        a |= sum(1 << b for b in ATTRIBUTE_BITS if r.random() < 0.2)
    if r.random() < 0.02:
        a |= 1 << r.randrange(64)
    return a


def _xfam(r: random.Random, fixed0: int) -> int:
    x = 3 | sum(g for g in XFAM_GROUPS if r.random() < 0.5)
    if x & 7 << 5 and r.random() < 0.9:
        x |= 1 << 2
    if r.random() < 0.2:
        x = fixed0
    if r.random() < 0.1:  # break a group that goes together
        x ^= 1 << r.choice((2, 5, 6, 7, 11, 12, 17, 18, 0))
    return x & fixed0 if r.random() < 0.9 else x


def _topology_row(r: random.Random, types: list[int], sub: int) -> Regs:
    t = types[sub] if sub < len(types) else 0
    number = sub if r.random() < 0.97 else r.choice((0, 1, 2, 7))
    return (r.choice((0, 1, 7)) if t else 0, r.choice((0, 2, 0x70)) if t else 0,
            number | t << 8, 0)


def _row_value(r: random.Random, leaf: int, sub: int, value: Regs, allowed: Regs,
               types: list[int]) -> Regs:
    c = r.random()
    x = value if c < 0.45 else (0, 0, 0, 0) if c < 0.6 else tuple(
        v & r.getrandbits(32) for v in value)
    a, b, cc, d = x
    if leaf == 1:
        a = r.choice(FMS) if r.random() < 0.4 else 0
    if leaf == 7 and sub == 0 and r.random() < 0.5:
        b = b & ~TSX | r.choice((0, 1 << 4, 1 << 11, TSX))
    if leaf == 0x1F:
        if r.random() < 0.3:
            return (0, 0, 0, 0)
        a, b, cc, d = (v & m for v, m in zip(_topology_row(r, types, sub), allowed, strict=True))
    return (a, b, cc, d)


def draw_case(r: random.Random) -> tuple[str, str, TdParams]:
    version, host = r.choice(sorted(MODULES))
    tables, _, sim = MODULES[(version, host)]
    types = r.choice(TOPOLOGIES)
    values = [_row_value(r, row.leaf, row.subleaf, row.values, t.allowed(), types)
              for row, t in zip(sim.td_conf.cpuid_config, tables.configurable, strict=True)]
    if r.random() < 0.15:  # a bit outside one row's masks
        k, n = r.randrange(len(values)), r.randrange(4)
        regs = list(values[k])
        regs[n] |= 1 << r.randrange(32)
        values[k] = (regs[0], regs[1], regs[2], regs[3])
    params = TdParams(
        attributes=_attributes(r), xfam=_xfam(r, sim.td_conf.xfam_fixed0),
        cpuid_values=tuple(values),
        max_vcpus=r.choice((1,) * 30 + (0, 576, 577, 1376, 1377)),
        config_flags=r.choice((4,) * 30 + (5, 5, 4 | 8, 4 | 16, 4 | 8 | 16, 0, 1, 0x20, 0x15)),
        eptp_controls=r.choice((0x1E,) * 30 + (0x26,) * 10 + (0x16, 0x1D, 0x5E, 0x1E | 1 << 12)),
        tsc_frequency=r.choice((84,) * 30 + (3, 4, 400, 401)))
    return version, host, params


def answers(version: str, host: str, p: TdParams) -> tuple[object, object]:
    """(sim, model): each (status, rcx, cpuid, faulting), or "unmodelled"."""
    tables, h, sim = MODULES[(version, host)]
    try:
        s = sim.mng_init(p)
        mine: object = (s.status, s.rcx, dict(s.cpuid) if s.status == 0 else None,
                        s.faulting if s.status == 0 else None)
    except Unmodelled:
        mine = "unmodelled"
    try:
        m = model.mng_init(tables, h, model.TdParams(
            attributes=p.attributes, xfam=p.xfam, cpuid_values=p.cpuid_values,
            max_vcpus=p.max_vcpus, config_flags=p.config_flags,
            eptp_controls=p.eptp_controls, tsc_frequency=p.tsc_frequency))
        theirs: object = (m.status, m.rcx, dict(m.cpuid or {}) if m.status == 0 else None,
                          m.faulting if m.status == 0 else None)
    except ModelUnmodelled:
        theirs = "unmodelled"
    return mine, theirs


# A case costs about 0.2 ms; hypothesis' own cost per example is what bounds the run, so
# each example is a seed for a batch of cases (the failing case is printed in full).
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.integers(0, 2**64 - 1))
def test_the_sim_and_the_model_agree_on_tdh_mng_init(seed: int) -> None:
    r = random.Random(seed)
    for _ in range(20):
        version, host, p = draw_case(r)
        mine, theirs = answers(version, host, p)
        assert mine == theirs, f"{version} on {host}: {p}"


def test_the_draws_reach_every_kind_of_answer() -> None:
    """The generator is worth its name: every status the rules can give comes up, and many
    requests are accepted, so effective CPUIDs are compared, not only refusals."""
    r = random.Random(11)
    seen: Counter[int] = Counter()
    for _ in range(4000):
        version, host, p = draw_case(r)
        mine, _ = answers(version, host, p)
        if isinstance(mine, tuple):
            seen[mine[0]] += 1
    operand = 0xC000010000000000
    assert {0, operand + 64, operand + 65, operand + 66, operand + 67, operand + 68,
            operand + 69, operand + 70, 0xC000090400000000, 0xC00009210000010A} <= set(seen)
    assert seen[0] >= 100, seen


# ---------------------------------------------------------------------------
# What the module reports (TDH.SYS.RD), against the model's enumeration.


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("host", HOSTS, ids=lambda h: h.name)
def test_the_reported_configuration_agrees(version: str, host: HostCpu) -> None:
    tables, _, sim = MODULES[(version, host.name)]
    conf = sim.td_conf
    assert tuple(r.values for r in conf.cpuid_config) == tdx_host.enumerate_config(tables, host)
    assert conf.xfam_fixed0 == tdx_host.reported_xfam_fixed0(tables, host)
    assert conf.attributes_fixed0 == tdx_host.reported_attributes_fixed0(tables, host)


def test_2_0_samples_leaf_23_as_zeros_on_a_cpu_without_perfmon_ext() -> None:
    """2.0.08 tdh_sys_init.c check_cpuid_configurations: "The CPU doesn't support leaf 0x23,
    set the sampled values to 0" (intel/tdx-module 1666adc).  The sim's reading found it;
    the model now has it too (RuleVariant.sysinit_23_zeroed)."""
    host = next(h for h in HOSTS if h.name == "no-perfmon-ext")
    tables, _, sim = MODULES[("2.0.08", host.name)]
    reported = tuple(r.values for r in sim.td_conf.cpuid_config)
    assert reported == tdx_host.enumerate_config(tables, host)
    assert reported[tables.row_keys().index((0x23, 0))] == (0, 0, 0, 0)

"""Properties of the mirror over random hosts and requests (spec sections 5 and 6)."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtdx.model.mirror import (
    predict_init_vm,
    reported_entries,
    supported_attrs,
    supported_xfam,
)
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, Host, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import is_value_register
from kvmtdx.outcome import Kind
from kvmtdx.structs import REGISTERS, CpuidEntry, InitVm

HLE_RTM = (1 << 4) | (1 << 11)
# Leaves whose native values must stay a real host's for any module to initialise on it
# (TDH.SYS.INIT checks the 0x1F topology and the address widths against LA57; a CPU with
# 5-level EPT has a physical width 1.5.x's PML5 rule takes): hosts() keeps the max host's.
KEPT_LEAVES = (0x1F, 0xB, 0x80000008)


def valid_xfam(xfam: int) -> int:
    """`xfam` made to meet check_xfam: AVX-512 (5-7) all or none and with AVX (2), CET (11,
    12) together, AMX (17, 18) together (helpers.c check_xfam)."""
    if xfam >> 5 & 7:
        xfam |= 7 << 5 | 1 << 2
    for pair in (3 << 11, 3 << 17):
        if xfam & pair != pair:
            xfam &= ~pair
    return xfam


u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)


@st.composite
def hosts(draw: st.DrawFn) -> Host:
    """Random native CPUID for every row any bundled module lists."""
    keys = {(r.leaf, r.subleaf) for m in BUNDLED_MODULES for r in load_profile(m).rows
            if r.leaf not in KEPT_LEAVES}
    dense = draw(st.booleans())  # mostly-set registers reach more of the module's bits
    reg = st.one_of(u32, st.just(0xFFFFFFFF)) if dense else u32
    native = {k: (draw(reg), draw(reg), draw(reg), draw(reg)) for k in sorted(
        keys, key=lambda k: (k[0], -1 if k[1] is None else k[1]))}
    xfam = draw(st.integers(min_value=0, max_value=(1 << 64) - 1)) | 0x3
    return replace(MAX_HOST, name="drawn", native={**MAX_HOST.native, **native}, kvm_xfam=xfam,
                   ept_5level=draw(st.booleans()), tsx_ctrl=draw(st.booleans()))


@settings(max_examples=60, deadline=None)
@given(host=hosts(), module=st.sampled_from(BUNDLED_MODULES))
def test_rfc_v2_reports_a_subset_of_upstream(host: Host, module: str) -> None:
    prof = load_profile(module)
    up = reported_entries(prof, host, get_policy("upstream"))
    rfc = reported_entries(prof, host, get_policy("rfc-v2"))
    for row, a, b in zip(prof.rows, up, rfc, strict=True):
        assert (a.function, a.index) == (b.function, b.index)
        for r in REGISTERS:
            if is_value_register(row.leaf, row.subleaf, r):
                assert a.reg(r) == b.reg(r)
            else:
                assert b.reg(r) & ~a.reg(r) == 0, (hex(row.leaf), row.subleaf, r)


@settings(max_examples=150, deadline=None)
@given(host=hosts(), module=st.sampled_from(BUNDLED_MODULES),
       policy=st.sampled_from(POLICY_NAMES), seed=st.integers(0, 2**32 - 1))
def test_any_request_inside_the_capabilities_is_accepted(host: Host, module: str, policy: str,
                                                         seed: int) -> None:
    prof, pol = load_profile(module), get_policy(policy)
    attrs, xfam_ok = supported_attrs(prof), supported_xfam(prof, host)
    if not attrs or not xfam_ok:
        return  # KVM_TDX_CAPABILITIES fails (-EIO): nothing was reported
    rng = random.Random(seed)
    attributes = attrs & rng.getrandbits(64)
    xfam = valid_xfam(xfam_ok & rng.getrandbits(64))
    if xfam & ~xfam_ok:
        xfam = 0  # the TD gets XFAM's fixed-1 bits (x87, SSE), which every host has
    entries: list[CpuidEntry] = []
    for row, rep in zip(prof.rows, reported_entries(prof, host, pol), strict=True):
        regs = [v & rng.getrandbits(32) for v in rep.regs()]
        if row.leaf == 0x1F:
            regs = [0, 0, 0, 0]  # all zero: the host's own topology (a random one is refused)
        if row.leaf == 1:  # FMS: 0 (native), or the native value when it is inside the report
            fms = host.native_fms()
            regs[0] = rng.choice((0, fms)) if fms & ~rep.eax == 0 else 0
        if row.leaf == 0x80000008:
            regs[0] = regs[0] & ~(0xFF << 16) | rng.choice(
                (48, 52) if host.ept_5level else (48,)) << 16
        elif rng.random() < 0.2:
            continue  # rows left out get zeros
        if (row.leaf, row.subleaf) == (7, 0) and not (
                host.tsx_ctrl and regs[1] & HLE_RTM == HLE_RTM and rng.random() < 0.5):
            regs[1] &= ~HLE_RTM
        # PKS and the bits XFAM lacks state for stay: the module overwrites or clears them.
        a, b, c, d = regs
        flags = 0 if row.subleaf is None else 1
        entries.append(CpuidEntry(row.leaf, row.kvm_index, flags, a, b, c, d))
    rng.shuffle(entries)
    req = Request(init_vm=InitVm(attributes=attributes, xfam=xfam, entries=tuple(entries)))
    out = predict_init_vm(prof, host, pol, req)
    assert out.kind is Kind.ACCEPTED, out.describe()

"""KVM_TDX_INIT_VM as the mirror predicts it: check order, find() traps, the module's checks."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest
from helpers import GPAW48, WAITPKG, bypass
from hypothesis import given
from hypothesis import strategies as st

from kvmtdx.model.mirror import (
    find,
    full_request,
    init_vm_prediction,
    predict_init_vm,
    reported_entries,
    silently_cleared,
)
from kvmtdx.model.mirror_kvm import allowlist_refuses, lands_on
from kvmtdx.model.policy import POLICY_NAMES, Allowlist, get_policy
from kvmtdx.model.profiles import (
    BUNDLED_MODULES,
    MAX_HOST,
    CpuidRow,
    Host,
    ModuleProfile,
    enumerated,
    load_profile,
    profile_of,
)
from kvmtdx.model.requests import Request
from kvmtdx.model.tdx_module_tables import ConfigRow, with_configurable
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.structs import REGISTERS, CpuidEntry, InitVm

CPUID_CONFIG_INVALID = 0xC000010000000045
SIG = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX
HLE, RTM, PKS = 1 << 4, 1 << 11, 1 << 31

# A host that is not 'max': some leaf-7 features, no TSX_CTRL, no 5-level EPT, no MWAIT,
# AVX but no AVX-512 or AMX state.
PLAIN = replace(
    MAX_HOST,
    name="plain",
    native={
        **MAX_HOST.native,
        (1, None): (0x000806F8, MAX_HOST.cpuid(1, None)[1], 0x10000000, 0x00005080),
        (7, 0): (0, 0x00000308 | HLE | RTM, 0x00000044, 0x4000001C),
        (7, 1): (0x00000010, 0, 0, 0),
    },
    kvm_xfam=0x2E7, tsx_ctrl=False, ept_5level=False,
)
HOSTS = (MAX_HOST, PLAIN)


def predict(module: str, policy: str, req: Request | InitVm, host: Host = MAX_HOST,
            **kw: bool) -> Outcome:
    return predict_init_vm(load_profile(module), host, get_policy(policy), req, **kw)


def full(module: str, policy: str, host: Host = MAX_HOST) -> Request:
    return full_request(load_profile(module), host, get_policy(policy))


def with_bit(req: Request, leaf: int, index: int, register: str, bit: int) -> Request:
    entries = tuple(
        e.with_reg(register, e.reg(register) | 1 << bit) if (e.function, e.index) == (leaf, index)
        else e for e in req.init_vm.entries
    )
    return replace(req, init_vm=replace(req.init_vm, entries=entries))


def iv(*entries: CpuidEntry, **kw: int) -> InitVm:
    return InitVm(xfam=0x3, entries=entries, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# The full request and the per-bit golden cases.


@pytest.mark.parametrize("host", HOSTS, ids=lambda h: h.name)
@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_full_request_is_accepted(module: str, policy: str, host: Host) -> None:
    req = full(module, policy, host)
    assert len(req.init_vm.entries) == len(load_profile(module).rows)
    out = predict(module, policy, req, host)
    assert out.kind is Kind.ACCEPTED and out.check == "accepted", out.describe()


def hidden_bits(module: str) -> list[tuple[int, int, str, int]]:
    """Bits the module lists on 'max' that rfc-v2 does not report (feature registers)."""
    prof = load_profile(module)
    got = reported_entries(prof, MAX_HOST, get_policy("rfc-v2"))
    out = []
    for row, listed, e in zip(prof.rows, enumerated(prof, MAX_HOST), got, strict=True):
        for r, m, v in zip(REGISTERS, listed, e.regs(), strict=True):
            out += [(row.leaf, row.kvm_index, r, b) for b in range(32) if (m & ~v) >> b & 1]
    return out


@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_each_hidden_bit_alone_is_kvm_rejected_under_rfc_v2(module: str) -> None:
    base = full(module, "rfc-v2")
    bits = hidden_bits(module)
    assert len(bits) > 20
    for leaf, index, r, b in bits:
        out = predict(module, "rfc-v2", with_bit(base, leaf, index, r, b))
        assert out.kind is Kind.KVM_REJECTED, (hex(leaf), index, r, b)
        assert (out.check, out.leaf, out.register, out.bit) == ("allowlist", leaf, r, b)


@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_hidden_bits_under_upstream_pass_kvm(module: str) -> None:
    """Today's kernels refuse only the denylist; the rest reaches the module (the hazard)."""
    base = full(module, "upstream")
    for leaf, index, r, b in hidden_bits(module):
        out = predict(module, "upstream", with_bit(base, leaf, index, r, b))
        if (leaf, index) == (7, 0) and (r, b) in (("ebx", 4), ("ebx", 11), ("ecx", 5)):
            assert (out.kind, out.check) == (Kind.KVM_REJECTED, "denylist")
        else:
            assert out.kind is Kind.ACCEPTED, (hex(leaf), index, r, b)


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_bits_the_module_does_not_list_are_module_rejected(module: str, policy: str) -> None:
    prof = load_profile(module)
    base = full(module, policy)
    tried = 0
    for row in prof.rows:
        for r, ok in zip(REGISTERS, row.module_allows(), strict=True):
            for b in range(32):
                if ok >> b & 1 or (row.leaf == 0x80000008 and r == "eax" and 16 <= b < 24):
                    continue
                out = predict(module, policy, with_bit(base, row.leaf, row.kvm_index, r, b))
                assert out.kind is Kind.MODULE_REJECTED, (hex(row.leaf), row.subleaf, r, b)
                assert out.hw_error == CPUID_CONFIG_INVALID and out.errno == errno.EINVAL
                assert (out.check, out.leaf, out.subleaf, out.register, out.bit) == (
                    "module_cpuid_config", row.leaf, row.subleaf, r, b)
                tried += 1
    assert tried > 500


def test_silently_cleared_bits_are_accepted_though_not_reported() -> None:
    prof = load_profile("2.0")
    i = prof.row_index(1, None)
    assert i is not None
    mask = silently_cleared(prof, PLAIN, i, "ecx")
    assert mask & 1 << 3  # MWAIT: allowed directly by the module, absent on this host
    assert silently_cleared(prof, MAX_HOST, i, "ecx") == 0
    for policy in POLICY_NAMES:
        rep = reported_entries(prof, PLAIN, get_policy(policy))[i]
        assert rep.ecx & 1 << 3 == 0
        out = predict("2.0", policy, with_bit(full("2.0", policy, PLAIN), 1, 0, "ecx", 3), PLAIN)
        assert out.kind is Kind.ACCEPTED


# ---------------------------------------------------------------------------
# find() traps (spec section 4).


@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_denylist_bypass(module: str) -> None:
    for policy in ("upstream", "upstream-6.16"):
        assert predict(module, policy, bypass()).kind is Kind.ACCEPTED
    out = predict(module, "rfc-v2", bypass())
    assert (out.kind, out.check, out.leaf, out.subleaf, out.register, out.bit) == (
        Kind.KVM_REJECTED, "allowlist", 7, 0, "ecx", 5)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_bypass_without_the_flagged_entries_breaks_the_count(policy: str) -> None:
    out = predict("2.0", policy, bypass(flagged=False))
    assert out.kind is Kind.KVM_REJECTED
    assert out.check == ("allowlist" if policy == "rfc-v2" else "count_mismatch")


def test_flagged_index_0_hits_the_denylist() -> None:
    req = iv(CpuidEntry(7, 0, SIG, ebx=HLE | RTM), GPAW48)
    out = predict("2.0", "upstream", req)
    assert (out.kind, out.check, out.register, out.bit) == (Kind.KVM_REJECTED, "denylist", "ebx", 4)
    req = iv(CpuidEntry(7, 0, 0, ecx=WAITPKG), GPAW48)
    out = predict("2.0", "upstream", req)
    assert (out.check, out.register, out.bit) == ("denylist", "ecx", 5)


def test_hle_with_index_1_slips_past_the_denylist() -> None:
    slip = CpuidEntry(7, 1, 0, ebx=HLE | RTM)
    # Alone it lands on 7.0, 7.1 and 7.2: not the denylist, but the count.
    out = predict("2.0", "upstream", iv(slip, GPAW48))
    assert (out.kind, out.check) == (Kind.KVM_REJECTED, "count_mismatch")
    # Balanced by two entries no row ever reaches, HLE+RTM reach 7.1 too: the module refuses.
    stray = CpuidEntry(0x40000000, 0, 0)
    out = predict("2.0", "upstream", iv(slip, GPAW48, stray, stray))
    assert (out.kind, out.hw_error, out.check, out.leaf, out.subleaf) == (
        Kind.MODULE_REJECTED, CPUID_CONFIG_INVALID, "module_cpuid_config", 7, 1)
    # Behind flagged 7.1 and 7.2 it reaches only row 7.0: accepted with TSX_CTRL ...
    req = bypass(ebx=HLE | RTM, ecx=0)
    assert predict("2.0", "upstream", req).kind is Kind.ACCEPTED
    # ... an -EIO from the module without it, and HLE alone breaks the module's coupling.
    no_tsx = replace(MAX_HOST, name="no-tsx", tsx_ctrl=False)
    out = predict("2.0", "upstream", req, no_tsx)
    assert (out.kind, out.errno, out.hw_error, out.check) == (
        Kind.ERROR, errno.EIO, 0, "module_tsx_ctrl")
    out = predict("2.0", "upstream", bypass(ebx=HLE, ecx=0))
    assert (out.kind, out.hw_error, out.check) == (
        Kind.MODULE_REJECTED, CPUID_CONFIG_INVALID, "module_hle_rtm")
    out = predict("2.0", "rfc-v2", req)
    assert (out.kind, out.check, out.register, out.bit) == (
        Kind.KVM_REJECTED, "allowlist", "ebx", 4)


def test_unflagged_entry_makes_up_for_a_stray_one() -> None:
    # One unflagged leaf-7 entry counts three times (7.0, 7.1, 7.2); two strays fill nent.
    req = iv(CpuidEntry(7, 0, 0), GPAW48, CpuidEntry(7, 9, SIG), CpuidEntry(0x40000000))
    for policy in POLICY_NAMES:
        assert predict("2.0", policy, req).kind is Kind.ACCEPTED
    # On 1.5.01 the same request still balances (it has 7.0, 7.1 and 7.2 as well).
    assert predict("1.5.01", "upstream", req).kind is Kind.ACCEPTED
    # One stray fewer: the count exceeds nent.
    assert predict("2.0", "upstream", iv(*req.entries[:3])).check == "count_mismatch"


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_duplicates_break_the_count(policy: str) -> None:
    base = full("2.0", policy)
    entries = base.init_vm.entries
    dup = replace(base.init_vm, entries=(*entries, entries[5]))
    assert predict("2.0", policy, dup).check == "count_mismatch"
    # The second copy is never looked at, whatever it carries.
    loud = replace(base.init_vm, entries=(*entries, entries[5].with_reg("ecx", WAITPKG)))
    assert predict("2.0", policy, loud).check == "count_mismatch"


def test_find_semantics() -> None:
    a, b, c = CpuidEntry(7, 1, SIG), CpuidEntry(7, 3, 0), CpuidEntry(7, 0, SIG)
    assert find((a, b, c), 7, 1) is a
    assert find((a, b, c), 7, 0) is b
    assert find((a, c), 7, 0) is c
    assert find((a,), 7, 2) is None
    assert find((a, b), 8, 0) is None


# ---------------------------------------------------------------------------
# KVM's checks in order, and the module's.


def test_kvm_check_order() -> None:
    ok = full("2.0", "upstream")
    bad_all = replace(ok, flags=1, hw_error=5, init_vm=replace(
        ok.init_vm, reserved=(1,) * 12, cpuid_padding=1, attributes=1, nent=300))
    assert predict("2.0", "upstream", bad_all, td_initialized=True).check == "cmd_hw_error"
    seq = [
        ("td_initialized", replace(bad_all, hw_error=0), True),
        ("cmd_flags", replace(bad_all, hw_error=0), False),
    ]
    for check, req, init in seq:
        assert predict("2.0", "upstream", req, td_initialized=init).check == check
    cur = replace(bad_all, hw_error=0, flags=0)
    out = predict("2.0", "upstream", cur)
    assert (out.kind, out.errno, out.check) == (Kind.ERROR, errno.E2BIG, "nent_too_big")
    cur = replace(cur, init_vm=replace(cur.init_vm, nent=None))
    assert predict("2.0", "upstream", cur).check == "reserved_nonzero"
    cur = replace(cur, init_vm=replace(cur.init_vm, reserved=(0,) * 12))
    assert predict("2.0", "upstream", cur).check == "cpuid_padding"
    cur = replace(cur, init_vm=replace(cur.init_vm, cpuid_padding=0))
    out = predict("2.0", "upstream", cur)
    assert (out.check, out.bit) == ("attributes_unsupported", 0)
    cur = replace(cur, init_vm=replace(cur.init_vm, attributes=0, xfam=1 << 63))
    out = predict("2.0", "upstream", cur)
    assert (out.kind, out.check, out.bit) == (Kind.KVM_REJECTED, "xfam_unsupported", 63)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_gpaw(policy: str) -> None:
    base = full("2.0", policy)
    rest = tuple(e for e in base.init_vm.entries if e.function != 0x80000008)

    def gpaw(entries: tuple[CpuidEntry, ...], host: Host = MAX_HOST) -> Outcome:
        return predict("2.0", policy, replace(base.init_vm, entries=entries), host)

    assert gpaw(rest).check == "gpaw_missing"
    assert gpaw((*rest, CpuidEntry(0x80000008, 1, SIG, eax=48 << 16))).check == "gpaw_missing"
    for g in (0, 39, 47, 53, 0xFF):
        assert gpaw((*rest, CpuidEntry(0x80000008, eax=g << 16))).check == "gpaw_value"
    five = (*rest, CpuidEntry(0x80000008, eax=52 << 16))
    assert gpaw(five).kind is Kind.ACCEPTED
    assert gpaw(five, replace(MAX_HOST, ept_5level=False)).check == "gpaw_5level"
    # Index and flags do not matter to find(0x80000008, 0) without the flag.
    assert gpaw((*rest, CpuidEntry(0x80000008, 7, 0, eax=48 << 16))).kind is Kind.ACCEPTED


def test_nent_below_the_entries_sent() -> None:
    base = full("2.0", "upstream")
    short = replace(base.init_vm, nent=len(base.init_vm.entries) - 1)
    # The last entry (0x18.8) is never read: its row gets zeros and the count still balances.
    assert predict("2.0", "upstream", short).kind is Kind.ACCEPTED
    rest = tuple(e for e in base.init_vm.entries if e.function != 0x80000008)
    no_gpaw = replace(base.init_vm, entries=(*rest, GPAW48), nent=len(rest))
    assert predict("2.0", "upstream", no_gpaw).check == "gpaw_missing"


def test_module_fms() -> None:
    base = full("2.0", "upstream")
    native = with_bit(base, 1, 0, "eax", 0)  # sets bit 0: 0x1 != native FMS
    assert predict("2.0", "upstream", native).check == "module_fms"
    same = replace(base, init_vm=replace(base.init_vm, entries=tuple(
        e.with_reg("eax", MAX_HOST.native_fms()) if e.function == 1 else e
        for e in base.init_vm.entries)))
    assert predict("2.0", "upstream", same).kind is Kind.ACCEPTED


def test_xfam_without_avx_state_clears_the_avx_bits() -> None:
    # tdh_mng_init.c apply_cpuid_xfam_masks (and leaf 1 under XFAM[2]): XFAM 0x3 with
    # every reported bit is accepted; the AVX and AVX-512 bits are cleared, not refused.
    # (The old model refused it as an XFAM gate.)
    base = full("2.0", "upstream")
    low = replace(base, init_vm=replace(base.init_vm, xfam=0x3))
    pred = init_vm_prediction(load_profile("2.0"), MAX_HOST, get_policy("upstream"), low)
    assert pred.outcome.kind is Kind.ACCEPTED and pred.effective is not None
    assert not pred.effective[(1, None)][2] & 1 << 28  # AVX
    assert not pred.effective[(7, 0)][1] & 1 << 16  # AVX512F
    cleared = {(c.leaf, c.register) for c in pred.changes if c.kind == "cleared"}
    assert {(1, "ecx"), (7, "ebx")} <= cleared


def custom(module: ModuleProfile, **kw: int) -> ModuleProfile:
    return replace(module, name="custom", tables=replace(module.tables, **kw))  # type: ignore[arg-type]


def test_module_attributes_and_xfam() -> None:
    prof = load_profile("2.0")
    req = iv(GPAW48)
    out = predict_init_vm(custom(prof, attributes_fixed1=1 << 28, attributes_fixed0=1),
                          MAX_HOST, get_policy("upstream"), req)
    assert (out.kind, out.hw_error, out.check) == (
        Kind.MODULE_REJECTED, 0xC000010000000040, "module_attributes")
    out = predict_init_vm(custom(prof, xfam_fixed1=0x3, xfam_fixed0=0x1), MAX_HOST,
                          get_policy("upstream"), replace(req, xfam=0))
    assert (out.kind, out.hw_error, out.check, out.bit) == (
        Kind.MODULE_REJECTED, 0xC000010000000041, "module_xfam", 1)


def test_module_pks_is_overwritten_not_refused() -> None:
    # tdh_mng_init.c: 7.0 ECX.PKS = ATTRIBUTES.PKS.  No public module lets a VMM configure
    # PKS, so a module build that did (a profile row with it) takes the bit and overwrites it;
    # the old model refused it as a coupling.
    prof = load_profile("2.0")
    assert not prof.rows[prof.row_index(7, 0) or 0].module_allows()[2] & PKS
    out = predict("2.0", "upstream", iv(CpuidEntry(7, 0, SIG, ecx=PKS), GPAW48))
    assert (out.kind, out.hw_error, out.check, out.leaf, out.bit) == (
        Kind.MODULE_REJECTED, CPUID_CONFIG_INVALID, "module_cpuid_config", 7, 31)
    rows = [ConfigRow(r.leaf, r.subleaf, r.config_direct,
                      (r.allow_direct[0], r.allow_direct[1], r.allow_direct[2] | PKS,
                       r.allow_direct[3]) if (r.leaf, r.subleaf) == (7, 0) else r.allow_direct,
                      -1) for r in prof.rows]
    pks = profile_of(with_configurable(prof.tables, rows), "pks", "test")
    pred = init_vm_prediction(pks, MAX_HOST, get_policy("upstream"),
                              iv(CpuidEntry(7, 0, SIG, ecx=PKS), GPAW48))
    assert pred.outcome.kind is Kind.ACCEPTED and pred.effective is not None
    assert not pred.effective[(7, 0)][2] & PKS
    assert [(c.kind, c.mask) for c in pred.changes if c.leaf == 7 and c.register == "ecx"] \
        == [("overridden", PKS)]


def test_request_or_bare_init_vm() -> None:
    req = full("2.0", "upstream")
    assert predict("2.0", "upstream", req.init_vm).kind is Kind.ACCEPTED
    assert predict("2.0", "upstream", req, td_initialized=True).check == "td_initialized"


def test_the_allowlist_never_judges_the_gpaw_field() -> None:
    """KVM's own GPAW interface (0x80000008 EAX[23:16]) is outside the allowlist, even where
    the module lists the bits and the allowlist allows nothing; every other listed bit is
    refused."""
    nothing = Allowlist(name="none", provenance="test", allowed={}, passthrough=frozenset(),
                        names={})
    policy = get_policy("rfc-v2", allowlist=nothing)
    gpaw_row = CpuidRow(0x80000008, None, (0xFFFFFFFF,) * 4, (0, 0, 0, 0))
    assert [allowlist_refuses(policy, gpaw_row, r, 0xFFFFFFFF) for r in REGISTERS] == [
        0xFF00FFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF]
    other = replace(gpaw_row, leaf=0x80000007)
    assert allowlist_refuses(policy, other, "eax", 0xFFFFFFFF) == 0xFFFFFFFF


_ENTRY = st.builds(CpuidEntry, st.sampled_from([1, 7, 0xD]), st.integers(0, 2),
                   flags=st.sampled_from([0, 1, 2, 3]))


@given(st.lists(_ENTRY, max_size=6), st.sampled_from([1, 7, 0xD]),
       st.one_of(st.none(), st.integers(0, 2)))
def test_find_is_the_first_entry_the_lookup_lands_on(entries: list[CpuidEntry], leaf: int,
                                                    index: int | None) -> None:
    """find() writes lands_on out for speed: the two must stay one rule."""
    want = next((e for e in entries if lands_on(e, leaf, index)), None)
    assert find(entries, leaf, index) is want

"""The pure parts `verify` judges with: the request builders and spec section 5's invariant."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import host_without

from kvmtdx.model import builders, invariant, mirror
from kvmtdx.model.builders import Trap
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, Host, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import GPAW_LEAF, LEAF7_EBX_HLE, LEAF7_EBX_RTM, LEAF7_ECX_WAITPKG
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, CpuidEntry

ACCEPTED = Outcome.classify(0, 0)
REFUSED = Outcome.classify(22, 0)
MWAIT = 1 << 3  # leaf 1 ECX: allow_direct in module 2.0
# A host with no native CPUID at all: every allow_direct bit is one the module drops.
# x87/SSE state only, and no MWAIT (an allow_direct bit of leaf 1 ECX).
BARE = host_without("bare", {(1, None): {"ecx": 1 << 3}}, kvm_xfam=0x3)


def predict(module: str, policy: str, req: Request, host: Host = MAX_HOST) -> Outcome:
    return mirror.predict_init_vm(load_profile(module), host, get_policy(policy), req)


def reported(module: str, policy: str, host: Host = MAX_HOST) -> tuple[CpuidEntry, ...]:
    return mirror.reported_entries(load_profile(module), host, get_policy(policy))


def base(module: str, host: Host = MAX_HOST) -> Request:
    return builders.base_request(mirror.supported_xfam(load_profile(module), host))


# ---------------------------------------------------------------------------
# Builders.


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_minimal_and_full_requests_from_the_report_are_accepted(module: str, policy: str) -> None:
    # What verify sends without a module profile: built from the capabilities alone.
    rep = reported(module, policy)
    xfam = mirror.supported_xfam(load_profile(module), MAX_HOST)
    assert predict(module, policy, base(module)).kind is Kind.ACCEPTED
    full = builders.full_request(rep, attributes=0, xfam=xfam)
    assert predict(module, policy, full).kind is Kind.ACCEPTED
    assert all(e.flags == FLAG_SIGNIFICANT_INDEX for e in full.init_vm.entries)
    assert not invariant.outside_reported(rep, full.init_vm.entries)


def test_full_request_meets_the_couplings_and_values() -> None:
    hle_rtm = LEAF7_EBX_HLE | LEAF7_EBX_RTM
    rep = (CpuidEntry(7, 0, 0, ebx=hle_rtm | 1), CpuidEntry(GPAW_LEAF, 0, 0, eax=0xFFFF30),
           CpuidEntry(1, 0, 0, eax=0x806F8, ebx=0x1234, ecx=MWAIT))
    with_tsx = builders.full_request(rep, attributes=0, xfam=3).init_vm.entries
    without = builders.full_request(rep, attributes=0, xfam=3, tsx_ctrl=False).init_vm.entries
    assert with_tsx[0].ebx == hle_rtm | 1 and without[0].ebx == 1
    assert with_tsx[1].eax == 48 << 16
    assert (with_tsx[2].eax, with_tsx[2].ebx, with_tsx[2].ecx) == (0, 0, MWAIT)
    unflagged = builders.full_request(rep, attributes=0, xfam=3, subleaves=[0, None, None])
    assert [e.flags for e in unflagged.init_vm.entries] == [FLAG_SIGNIFICANT_INDEX, 0, 0]
    with pytest.raises(ValueError):
        builders.full_request(rep, attributes=0, xfam=3, subleaves=[0])


def test_base_request_merges_and_sets_what_a_check_breaks() -> None:
    extra = CpuidEntry(GPAW_LEAF, 0, FLAG_SIGNIFICANT_INDEX, ebx=1)
    req = builders.base_request(7, (extra, builders.strays(1)[0]), hw_error=1, nent=9)
    assert req.hw_error == 1 and req.init_vm.nent == 9 and req.init_vm.xfam == 7
    gpaw, stray = req.init_vm.entries
    assert (gpaw.eax, gpaw.ebx) == (48 << 16, 1)
    assert stray.function == builders.STRAY_LEAF
    assert builders.base_request(7, gpaw=None).init_vm.entries == ()
    assert builders.base_request(7, gpaw=52).init_vm.entries[0].eax == 52 << 16


# The mirror's check naming each trap's answer: the steering is upstream's hole (spec
# section 4); a duplicate whose bits sit in the entry find() never takes breaks the count.
TRAP_CHECKS = {
    "upstream": {Trap.STEER: "accepted", Trap.MULTI: "count_mismatch",
                 Trap.STRAY: "module_cpuid_config", Trap.DUP_FIRST: "denylist",
                 Trap.DUP_SECOND: "count_mismatch"},
    "rfc-v2": {Trap.STEER: "allowlist", Trap.MULTI: "allowlist", Trap.STRAY: "allowlist",
               Trap.DUP_FIRST: "allowlist", Trap.DUP_SECOND: "count_mismatch"},
}


@pytest.mark.parametrize("policy", sorted(TRAP_CHECKS))
@pytest.mark.parametrize("trap", list(Trap))
def test_each_trap_reaches_the_lookup_it_names(policy: str, trap: Trap) -> None:
    req = builders.trap_request(trap, base("2.0"), reported("2.0", policy), ebx=0,
                                ecx=LEAF7_ECX_WAITPKG)
    assert predict("2.0", policy, req).check == TRAP_CHECKS[policy][trap]
    assert req.init_vm.entries[-1].function == GPAW_LEAF or trap is Trap.STRAY


# ---------------------------------------------------------------------------
# The invariant.


def with_entry(req: Request, e: CpuidEntry) -> Request:
    return builders.base_request(req.init_vm.xfam, (e,))


def test_an_unreported_bit_accepted_breaks_the_invariant() -> None:
    rep = reported("2.0", "upstream")
    req = builders.trap_request(Trap.STEER, base("2.0"), rep, ebx=0, ecx=LEAF7_ECX_WAITPKG)
    j = invariant.judge(rep, req, ACCEPTED)
    assert not j.kept and j.outside == ((7, 5, "ecx", 5),) and j.exempt == ()
    assert invariant.judge(rep, req, REFUSED).kept


def test_reported_bits_and_value_registers_never_break_it() -> None:
    rep = reported("2.0", "rfc-v2")
    full = mirror.full_request(load_profile("2.0"), MAX_HOST, get_policy("rfc-v2"))
    assert invariant.judge(rep, full, ACCEPTED) == invariant.InvariantJudgement(True, (), ())
    fms = with_entry(base("2.0"), CpuidEntry(1, 0, FLAG_SIGNIFICANT_INDEX, eax=0x806F8))
    assert invariant.judge(rep, fms, ACCEPTED).kept


def test_entries_past_nent_do_not_count() -> None:
    rep = reported("2.0", "upstream")
    req = with_entry(base("2.0"), CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX, ecx=LEAF7_ECX_WAITPKG))
    assert not invariant.judge(rep, req, ACCEPTED).kept
    gpaw_only = replace(req, init_vm=replace(req.init_vm, nent=1))
    assert invariant.judge(rep, gpaw_only, ACCEPTED).kept


def test_silently_cleared_bits_are_exempt_only_when_the_module_is_known() -> None:
    module = load_profile("2.0")
    rep = reported("2.0", "rfc-v2", BARE)
    leaf1 = next(e for e in rep if e.function == 1)
    assert not leaf1.ecx & MWAIT
    req = with_entry(base("2.0", BARE), CpuidEntry(1, 0, FLAG_SIGNIFICANT_INDEX, ecx=MWAIT))
    assert predict("2.0", "rfc-v2", req, BARE).kind is Kind.ACCEPTED
    known = invariant.judge(rep, req, ACCEPTED, module=module, host=BARE)
    assert known.kept and known.exempt == ((1, 0, "ecx", 3),) and known.outside == ()
    assert not invariant.judge(rep, req, ACCEPTED).kept
    assert not invariant.judge(rep, req, ACCEPTED, module=module, host=MAX_HOST).kept

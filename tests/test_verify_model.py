"""The pure parts `verify` judges with: the request builders and spec section 5's invariant."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import host_without

from kvmtdx.model import builders, fit, invariant, mirror, rules
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
    # Judged on the row KVM's lookup lands it on (7.0), not by the entry's own index 5.
    assert not j.kept and j.outside == ((7, 0, "ecx", 5),) and j.exempt == ()
    assert invariant.judge(rep, req, REFUSED).kept


def test_an_entry_whose_index_the_lookup_ignores_is_judged_on_its_row() -> None:
    """A one-row leaf sent unflagged with index 0xffffffff lands on its row: its reported bits
    are inside, so a kernel refusing it is not "stricter than the model", it is wrong."""
    rep = reported("2.0", "upstream")
    leaf1 = next(e for e in rep if e.function == 1)
    req = with_entry(base("2.0"), CpuidEntry(1, 0xFFFFFFFF, 0, ecx=leaf1.ecx, edx=leaf1.edx))
    assert invariant.judge(rep, req, ACCEPTED) == invariant.InvariantJudgement(True, (), ())
    assert not invariant.is_known_hole(rep, req, ACCEPTED)


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


# ---------------------------------------------------------------------------
# Verdicts follow the invariant where the exact prediction is the policy's known hole.


def _steer(policy: str) -> tuple[tuple[CpuidEntry, ...], Request]:
    rep = reported("2.0", policy)
    return rep, builders.trap_request(Trap.STEER, base("2.0"), rep, ebx=0,
                                      ecx=LEAF7_ECX_WAITPKG)


def test_a_kernel_that_refuses_the_known_hole_is_stricter_not_wrong() -> None:
    rep, req = _steer("upstream")
    pred = predict("2.0", "upstream", req)
    assert pred.kind is Kind.ACCEPTED  # predictions stay exact: upstream has the hole
    assert invariant.against_prediction(rep, req, pred, REFUSED) is invariant.Agreement.STRICTER
    assert invariant.against_prediction(rep, req, pred, ACCEPTED) is invariant.Agreement.SAME
    # The same hole with strays balancing the count: the bits reach the module, which
    # refuses them where they land on row 7.1; KVM refusing them is what the invariant asks.
    stray = builders.trap_request(Trap.STRAY, base("2.0"), rep, ebx=0, ecx=LEAF7_ECX_WAITPKG)
    pred = predict("2.0", "upstream", stray)
    assert pred.kind is Kind.MODULE_REJECTED
    assert invariant.is_known_hole(rep, stray, pred, module=load_profile("2.0"), host=MAX_HOST)
    assert invariant.against_prediction(rep, stray, pred, REFUSED, module=load_profile("2.0"),
                                        host=MAX_HOST) is invariant.Agreement.STRICTER
    # Without the module and host, which bits the module would take is unknown.
    assert invariant.against_prediction(rep, stray, pred, REFUSED) \
        is invariant.Agreement.DIFFERS
    pred = predict("2.0", "upstream", req)
    # Refused, but past KVM: the module saw bits KVM never reported.
    module_said_no = Outcome.classify(22, 0xC000010000000045)
    assert invariant.against_prediction(rep, req, pred, module_said_no) \
        is invariant.Agreement.DIFFERS


def test_only_a_prediction_that_breaks_the_invariant_excuses_a_difference() -> None:
    # The minimal request: its prediction (ACCEPTED) keeps the invariant, so a kernel that
    # refuses it is wrong, however strict that looks.
    rep = reported("2.0", "upstream")
    req = base("2.0")
    pred = predict("2.0", "upstream", req)
    assert pred.kind is Kind.ACCEPTED
    assert invariant.against_prediction(rep, req, pred, REFUSED) is invariant.Agreement.DIFFERS
    # An unreported bit the module refuses: predicted MODULE_REJECTED, which keeps the
    # invariant, so KVM refusing it instead is a difference, not strictness.
    module = load_profile("2.0")
    row = module.rows[module.row_index(7, 0) or 0]
    bit = rules.lowest_bit(~row.module_allows()[1] & rules.FULL)
    odd = with_entry(base("2.0"), CpuidEntry(7, 0, FLAG_SIGNIFICANT_INDEX, ebx=1 << bit))
    pred = predict("2.0", "upstream", odd)
    assert pred.kind is Kind.MODULE_REJECTED
    assert invariant.against_prediction(rep, odd, pred, REFUSED, module=module,
                                        host=MAX_HOST) is invariant.Agreement.DIFFERS
    # WAITPKG flagged onto row 7.1, where the module cannot take it: its refusal is the
    # module's (spec section 5), so KVM refusing it is a difference too.
    misplaced = with_entry(base("2.0"), CpuidEntry(7, 1, FLAG_SIGNIFICANT_INDEX,
                                                   ecx=LEAF7_ECX_WAITPKG))
    pred = predict("2.0", "upstream", misplaced)
    assert pred.kind is Kind.MODULE_REJECTED
    assert invariant.against_prediction(rep, misplaced, pred, REFUSED, module=module,
                                        host=MAX_HOST) is invariant.Agreement.DIFFERS


# ---------------------------------------------------------------------------
# Whether a profile can be the module behind a report.


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_every_kernel_report_fits_its_own_module_even_with_a_bug(module: str,
                                                                 policy: str) -> None:
    from kvmtdx.device import Kvm
    from kvmtdx.sim import CATALOGUE, SimulatedHost

    m = load_profile(module)
    for mutant in [None, *(x.name for x in CATALOGUE if policy in x.policies)]:
        for host in (MAX_HOST, BARE):
            with Kvm(SimulatedHost(m, host, get_policy(policy), mutant=mutant)) as kvm, \
                    kvm.create_td() as td:
                caps = td.capabilities()
            assert fit.profile_mismatch(m, caps) == [], (mutant, host.name)


def test_a_report_no_kernel_on_the_profiles_module_can_give_is_named() -> None:
    m = load_profile("2.0")
    pred = mirror.predict_capabilities(m, MAX_HOST, get_policy("rfc-v2"), len(m.rows))
    assert pred.caps is not None
    caps = pred.caps
    assert fit.profile_mismatch(load_profile("1.5.01"), caps) == [
        "KVM lists 28 CPUID rows, module 1.5.01 has 12"]
    swapped = replace(caps, entries=(caps.entries[1], caps.entries[0], *caps.entries[2:]))
    assert fit.profile_mismatch(m, swapped)[0].startswith("entry 0 is 0x4.0, the module's row 0")
    assert fit.profile_mismatch(m, replace(caps, supported_xfam=caps.supported_xfam | 1 << 40))
    assert fit.profile_mismatch(m, replace(caps, supported_xfam=0x2))  # lacks x87 (fixed1)
    assert fit.profile_mismatch(m, replace(caps, supported_attrs=1 << 5))

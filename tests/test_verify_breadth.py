"""Each check written to cover a whole domain, the accepting direction or a TD's lifecycle
comes with a seeded kernel bug that it, and no other check, catches: the proof that the
check adds something the suite did not have.

Each run is the whole suite against the simulated 2.0 host under the policy the mutant is
for (rfc-v2 for bugs of every kernel); the failures it adds to the clean kernel's must be
exactly the one check.
"""

from __future__ import annotations

import pytest

from kvmtdx import checks, sim
from kvmtdx.knowledge import given
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.session import simulated_backend

# mutant -> the one check that catches it.
ONLY_CATCHER: dict[str, str] = {
    "lookup_resumes_after_flagged_match": "init_vm_entry_order_accepted",
    "flags_compared_whole": "init_vm_ignored_flag_bits_accepted",
    "no_subleaf_index_checked": "init_vm_ignored_index_accepted",
    "steered_entry_refused": "adversarial_steer_legal_accepted",
    "init_vm_value_registers_filtered": "init_vm_value_registers_realistic_accepted",
    "reserved_check_covers_mrownerconfig": "init_vm_measurements_accepted",
    "attributes_checked_32_bits": "init_vm_attributes_each_bit_rejected",
    "xfam_checked_32_bits": "init_vm_xfam_each_bit_rejected",
    "gpaw_range_check": "init_vm_gpaw_domain_rejected",
    "nent_signed_compare": "init_vm_nent_limits",
    "reserved_low_halves_only": "init_vm_reserved_each_word_rejected",
    "allowlist_steered_by_entry_index": "adversarial_steer_every_row",
    "td_state_set_before_checks": "lifecycle_reinit_after_kvm_refusal",
    "module_refusal_leaves_td_initialized": "lifecycle_reinit_after_module_refusal",
    "key_id_held_after_refusal": "lifecycle_reinit_after_module_refusal",
    "caps_refused_after_init_vm": "lifecycle_caps_after_init_vm",
    "td_state_checked_after_copy": "lifecycle_second_init_refused_first",
    "get_cpuid_e2big_writes_entries": "effective_get_cpuid_e2big",
    "get_cpuid_gpaw_unfixed": "effective_matches_prediction",
    "vcpu_without_split_irqchip": "effective_vcpu_lifecycle",
}
# A bug that lets a hidden bit through to an ACCEPTED TD is seen there too: the effective
# group reads the TD's CPUID after every request the suite saw ACCEPTED.
IN_THE_TD = "effective_no_hidden_bits"
SEEN_IN_THE_TD = frozenset({"allowlist_steered_by_entry_index"})


def failures(policy: str, mutant: str | None = None) -> set[str]:
    b = simulated_backend(load_profile("2.0"), MAX_HOST, get_policy(policy), mutant=mutant)
    r = checks.run_verify(b.seam, backend_label="sim", given=given(b.simulation, policy=policy))
    return {c.id for c in r.checks if c.status == "fail"}


_CLEAN: dict[str, set[str]] = {}


def clean(policy: str) -> set[str]:
    if policy not in _CLEAN:
        _CLEAN[policy] = failures(policy)
    return _CLEAN[policy]


def policy_of(mutant: str) -> str:
    m = sim.mutants.BY_NAME[mutant]
    return "rfc-v2" if "rfc-v2" in m.policies else m.policies[0]


def test_each_named_mutant_and_check_exists() -> None:
    ids = {s.id for s in checks.CHECKS}
    assert set(ONLY_CATCHER) <= set(sim.MUTANTS)
    assert set(ONLY_CATCHER.values()) <= ids


@pytest.mark.parametrize("mutant", sorted(ONLY_CATCHER))
def test_the_mutant_is_caught_by_its_check_alone(mutant: str) -> None:
    policy = policy_of(mutant)
    added = failures(policy, mutant) - clean(policy)
    also = {IN_THE_TD} if mutant in SEEN_IN_THE_TD else set()
    assert added == {ONLY_CATCHER[mutant]} | also, f"{mutant} under {policy}"


@pytest.mark.parametrize("policy", ["upstream", "rfc-v2"])
def test_the_new_checks_pass_on_the_clean_kernels(policy: str) -> None:
    assert not clean(policy) & set(ONLY_CATCHER.values())

"""Every seeded kernel bug fails exactly the checks written to catch it, so a check that
stopped failing (made to pass whatever the kernel does) fails a test here.

Each check written to cover a whole domain, the accepting direction or a TD's lifecycle
comes with a seeded kernel bug that it, and no other check, catches: the proof that the
check adds something the suite did not have.  The other bugs name every check they fail:
test_verify only asks that a bug fails something, which a check broken to always pass
would not disturb where another check catches the same bug.

Each run is the whole suite against the simulated 2.0 host under the policy the mutant is
for (rfc-v2 for bugs of every kernel); the failures it adds to the clean kernel's must be
exactly the checks named.
"""

from __future__ import annotations

import pytest
from helpers import mutant_policy

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
    "td_state_set_before_checks": "lifecycle_reinit_after_kvm_refusal",
    "module_refusal_leaves_td_initialized": "lifecycle_reinit_after_module_refusal",
    "key_id_held_after_refusal": "lifecycle_reinit_after_module_refusal",
    "caps_refused_after_init_vm": "lifecycle_caps_after_init_vm",
    "td_state_checked_after_copy": "lifecycle_second_init_refused_first",
    "get_cpuid_e2big_writes_entries": "effective_get_cpuid_e2big",
    "get_cpuid_gpaw_unfixed": "effective_matches_prediction",
    "vcpu_without_split_irqchip": "effective_vcpu_lifecycle",
    "e2big_writes_buffer": "caps_e2big_buffer_untouched",
    "nent_limit_off_by_one": "init_vm_nent_256_not_e2big",
    "caps_header_not_echoed": "caps_buffer_matches_prediction",
}

# A bug one answer of the kernel shows to several checks: every one of them.
_CAPS = ("caps_buffer_matches_prediction", "caps_entries_match_prediction")
_BYPASS = ("adversarial_denylist_bypass_hle_rtm", "adversarial_denylist_bypass_stray_balance",
           "adversarial_denylist_bypass_waitpkg", "adversarial_matches_prediction")
_HIDDEN = ("adversarial_steer_every_row", "effective_no_hidden_bits",
           "init_vm_unreported_bits_refused")
_REINIT = ("lifecycle_reinit_after_kvm_refusal", "lifecycle_reinit_after_module_refusal")
CATCHERS: dict[str, frozenset[str]] = {m: frozenset({c}) for m, c in ONLY_CATCHER.items()} | {
    m: frozenset(c) for m, c in {
        "allowlist_steered_by_entry_index": ("adversarial_steer_every_row",
                                             "effective_no_hidden_bits"),
        "caps_allowlist_unapplied": (*_CAPS, "policy_allowlist_filter"),
        "init_vm_allowlist_unenforced": (*_BYPASS, *_HIDDEN),
        "allowlist_skips_row_7_1": _HIDDEN,
        "allowlist_skips_7_0_edx": _HIDDEN,
        "value_registers_filtered": (*_CAPS, "policy_value_registers_unfiltered"),
        "core_capabilities_forgotten": (*_CAPS, "adversarial_steer_every_row",
                                        "adversarial_steer_legal_accepted",
                                        "policy_core_capabilities_reported"),
        "denylist_hle_not_rtm": (*_CAPS, "policy_denylist_hidden"),
        "subleaf_ffffffff_unmapped": (*_CAPS, *_REINIT, "init_vm_gpaw_52",
                                      "init_vm_measurements_accepted",
                                      "init_vm_minimal_accepted",
                                      "init_vm_module_status_written_back",
                                      "init_vm_unreported_bits_refused",
                                      "policy_allowlist_filter"),
        "gpaw_not_forced": (*_CAPS, "policy_gpaw_reported_ff",
                            "policy_value_registers_unfiltered"),
        "flags_unchecked": ("caps_flags_rejected", "init_vm_flags_rejected"),
        "reserved_unchecked": ("init_vm_reserved_each_word_rejected", "init_vm_reserved_rejected",
                               "lifecycle_reinit_after_kvm_refusal"),
        "padding_unchecked": ("init_vm_padding_rejected", "init_vm_reserved_each_word_rejected"),
        "hw_error_not_copied": ("init_vm_module_status_written_back",
                                "init_vm_unreported_bits_refused",
                                "lifecycle_reinit_after_module_refusal"),
        "allowlist_reject_eio": (*_BYPASS, "adversarial_duplicate_entries",
                                 "adversarial_steer_every_row", "adversarial_unflagged_multi_match",
                                 "init_vm_unreported_bits_refused"),
        "key_id_leak_on_failure": (*_REINIT, "adversarial_steer_legal_accepted",
                                   "hygiene_key_ids_released", "init_vm_entry_order_accepted",
                                   "init_vm_unreported_bits_refused",
                                   "init_vm_value_registers_realistic_accepted"),
        "count_check_missing": ("adversarial_duplicate_entries", "adversarial_matches_prediction",
                                "init_vm_nent_256_not_e2big", "init_vm_nent_limits",
                                "init_vm_unlisted_leaf_rejected",
                                "lifecycle_reinit_after_kvm_refusal"),
        "get_cpuid_returns_request": ("effective_matches_prediction", "effective_vcpu_lifecycle"),
    }.items()}
BUGS = sorted(m.name for m in sim.CATALOGUE if not m.fix)


def failures(policy: str, mutant: str | None = None) -> set[str]:
    b = simulated_backend(load_profile("2.0"), MAX_HOST, get_policy(policy), mutant=mutant)
    r = checks.run_verify(b.seam, backend_label="sim", given=given(b.simulation, policy=policy))
    return {c.id for c in r.checks if c.status == "fail"}


_CLEAN: dict[str, set[str]] = {}


def clean(policy: str) -> set[str]:
    if policy not in _CLEAN:
        _CLEAN[policy] = failures(policy)
    return _CLEAN[policy]


def test_every_bug_and_check_named_exists() -> None:
    ids = {s.id for s in checks.CHECKS}
    assert sorted(CATCHERS) == BUGS
    assert set().union(*CATCHERS.values()) <= ids


@pytest.mark.parametrize("mutant", BUGS)
def test_the_mutant_fails_exactly_its_checks(mutant: str) -> None:
    policy = mutant_policy(mutant)
    added = failures(policy, mutant) - clean(policy)
    assert added == CATCHERS[mutant], f"{mutant} under {policy}"


@pytest.mark.parametrize("policy", ["upstream", "rfc-v2"])
def test_the_new_checks_pass_on_the_clean_kernels(policy: str) -> None:
    assert not clean(policy) & set(ONLY_CATCHER.values())

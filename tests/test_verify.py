"""`kvmtdx verify`: no false alarm, the known hole found, every seeded bug caught.

Runs go through cli.main in-process; each simulated run creates about a
thousand TDs.  The report formats (text, KTAP, JSON, JUnit) are tested in
test_verify_formats.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import WARN_CHECK, mutant_policy, run_cli, warn_failures

from kvmtdx import checks, cli, sim
from kvmtdx.device import Kvm
from kvmtdx.knowledge import given
from kvmtdx.model.infer import module_from_capabilities
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, load_profile, profile_to_json
from kvmtdx.session import Backend, simulated_backend

BYPASS_PREFIX = "adversarial_denylist_bypass_"
LEAK_CHECK = "effective_no_hidden_bits"


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """`kvmtdx verify ARGV --format json`: exit code and report."""
    r = run_cli(capsys, "verify", *argv, "--format", "json")
    return r.rc, r.json()


def failing(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in data["checks"] if c["status"] == "fail"}


# ---------------------------------------------------------------------------
# No false alarm; the real hole found.


@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_rfc_v2_fails_only_the_kernel_warn_for_every_bundled_module(
        capsys: pytest.CaptureFixture[str], module: str) -> None:
    # The series closes the bypass but keeps 7.3's WARN on a non-operand module status.
    rc, data = run_json(capsys, "--simulate", f"{module}:rfc-v2")
    assert set(failing(data)) == warn_failures(module)
    assert rc == (1 if warn_failures(module) else 0)
    assert data["policy"] == "rfc-v2"
    assert data["summary"]["passed"] >= 35
    assert data["summary"]["tds_created"] > 100


@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_rfc_v2_passes_the_effective_group_on_every_bundled_module(
        capsys: pytest.CaptureFixture[str], module: str) -> None:
    """What the TD gets, read back through a vCPU: every check of the group runs and passes,
    set_cpuid2_consistency recording what KVM_SET_CPUID2 took."""
    rc, data = run_json(capsys, "--simulate", f"{module}:rfc-v2", "--group", "effective")
    status = {c["id"]: c["status"] for c in data["checks"]}
    assert status == {"effective_vcpu_lifecycle": "pass", "effective_get_cpuid_e2big": "pass",
                      "effective_matches_prediction": "pass",
                      "effective_requested_bits_present": "pass",
                      "effective_no_hidden_bits": "pass", SET_CPUID2: "info"}
    assert rc == 0 and data["verdict"] == "pass"


@pytest.mark.parametrize("policy", ["upstream", "upstream-6.16"])
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_upstream_fails_only_the_denylist_bypass(capsys: pytest.CaptureFixture[str],
                                                 module: str, policy: str) -> None:
    rc, data = run_json(capsys, "--simulate", f"{module}:{policy}")
    fails = failing(data)
    assert rc == 1
    assert set(fails) == {f"{BYPASS_PREFIX}waitpkg", f"{BYPASS_PREFIX}hle_rtm",
                          f"{BYPASS_PREFIX}stray_balance", LEAK_CHECK} | warn_failures(module)
    waitpkg = fails[f"{BYPASS_PREFIX}waitpkg"]
    assert waitpkg["actual"].startswith("ACCEPTED")
    assert [b["name"] for b in waitpkg["bits"]] == ["WAITPKG"]
    assert {b["name"] for b in fails[f"{BYPASS_PREFIX}hle_rtm"]["bits"]} == {"HLE", "RTM"}
    # The proof of impact: the bypassed bits are in the TD's CPUID (KVM_TDX_GET_CPUID).
    leak = fails[LEAK_CHECK]
    assert {b["name"] for b in leak["bits"]} == {"WAITPKG", "HLE", "RTM"}
    assert "WAITPKG set in the TD's CPUID" in leak["detail"]
    assert leak["request"] is not None
    assert data["policy"] == policy and "auto" in data["policy_reason"]


# ---------------------------------------------------------------------------
# Every seeded kernel bug is caught.


_BASELINE: dict[str, set[str]] = {}


def baseline_failures(policy: str) -> set[str]:
    if policy not in _BASELINE:
        m, p = load_profile("2.0"), get_policy(policy)
        b = simulated_backend(m, MAX_HOST, p)
        r = checks.run_verify(b.seam, backend_label="sim", given=given(b.simulation, policy=policy))
        _BASELINE[policy] = {c.id for c in r.checks if c.status == "fail"}
    return _BASELINE[policy]


BUGS = sorted(m.name for m in sim.CATALOGUE if not m.fix)
FIXES = [(m.name, p) for m in sim.CATALOGUE if m.fix for p in m.policies]


@pytest.mark.parametrize("mutant", BUGS)
def test_every_mutant_is_caught(capsys: pytest.CaptureFixture[str], mutant: str) -> None:
    policy = mutant_policy(mutant)
    rc, data = run_json(capsys, "--simulate", f"2.0:{policy}:{mutant}", "--policy", policy)
    assert rc == 1
    new = {k: v for k, v in failing(data).items() if k not in baseline_failures(policy)}
    assert new, f"mutant {mutant} ({policy}) fails nothing the clean kernel passes"
    for c in new.values():
        # Each failure names its rule (the id) and says what differed, by bit where one is.
        assert c["detail"]
        assert c["bits"] or (c["expected"] != c["actual"])


def test_the_mutant_list_is_what_the_test_enumerates() -> None:
    # Collection enumerates sim.MUTANTS, so a new mutant runs without touching this file;
    # this pins that each has a policy the suite knows.
    for name in sim.MUTANTS:
        assert mutant_policy(name) in ("upstream", "upstream-6.16", "rfc-v2"), name


# ---------------------------------------------------------------------------
# Knowledge modes.


@pytest.mark.parametrize("policy", ["rfc-v2", "upstream"])
def test_without_a_module_only_the_invariant_runs(policy: str) -> None:
    m = load_profile("2.0")
    plugin = Backend(sim.SimulatedHost(m, MAX_HOST, get_policy(policy)), "plug-in")
    r = checks.run_verify(plugin.seam, backend_label="plug-in", given=given(plugin.simulation),
                          kernel_release="7.3.0")
    status = {c.id: c for c in r.checks}
    assert status["caps_entries_match_prediction"].status == "skip"
    assert "--module" in status["caps_entries_match_prediction"].detail
    assert status["init_vm_unreported_bits_refused"].status == "pass"
    assert status["init_vm_all_reported_accepted"].status == "pass"
    fails = {c.id for c in r.failures()}
    # The kernel-WARN check needs no profile: the malformed 0x1F rows come from the report.
    assert fails == {WARN_CHECK} | (set() if policy == "rfc-v2" else
                                    {f"{BYPASS_PREFIX}waitpkg", f"{BYPASS_PREFIX}hle_rtm",
                                     f"{BYPASS_PREFIX}stray_balance", LEAK_CHECK})
    # Without a profile the TD's CPUID is judged by what was sent and never reported.
    assert status["effective_matches_prediction"].status == "skip"
    assert r.knowledge is not None and "kernel release 7.3.0" in r.knowledge.policy_reason


def test_module_without_host_infers_it() -> None:
    m = load_profile("2.0")
    plugin = Backend(sim.SimulatedHost(m, MAX_HOST, get_policy("rfc-v2")), "plug-in")
    r = checks.run_verify(plugin.seam, backend_label="plug-in",
                          given=given(plugin.simulation, module="2.0", policy="auto"))
    assert {c.id for c in r.failures()} == {WARN_CHECK}
    assert r.knowledge is not None and r.knowledge.policy is not None
    assert r.knowledge.policy.name == "rfc-v2" and not r.knowledge.host_exact


def test_unknown_release_without_module_skips_policy_rules() -> None:
    m = load_profile("1.5.01")
    r = checks.run_verify(sim.SimulatedHost(m, MAX_HOST, get_policy("rfc-v2")),
                          backend_label="plug-in", kernel_release="5.10.0")
    assert r.knowledge is not None and r.knowledge.policy is None
    assert "give --policy" in r.knowledge.policy_reason
    assert {c.id: c.status for c in r.checks}["policy_allowlist_filter"] == "skip"
    assert r.failures() == ()


def test_save_module_then_verify_the_patched_kernel(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    saved = tmp_path / "host-module.json"
    assert cli.main(["caps", "--simulate", "2.0:upstream", "--policy", "upstream",
                     "--save-module", str(saved)]) == 0
    capsys.readouterr()
    profile = load_profile(str(saved))
    i = profile.row_index(7, 0)
    assert i is not None and profile.unknown_mask(i)[2] & 1 << 5  # WAITPKG: hidden, unknown
    rc, data = run_json(capsys, "--simulate", "2.0:rfc-v2", "--module", str(saved),
                        "--policy", "rfc-v2")
    assert (rc, set(failing(data))) == (1, {WARN_CHECK})
    assert data["module_source"].startswith(f"--module {saved}")


def test_save_module_needs_a_policy(capsys: pytest.CaptureFixture[str],
                                    tmp_path: Path) -> None:
    assert cli.main(["caps", "--simulate", "2.0", "--save-module",
                     str(tmp_path / "m.json")]) == 2
    assert "--policy" in capsys.readouterr().err


def test_save_module_with_a_base_restores_the_table() -> None:
    m = load_profile("2.0")
    with Kvm(sim.SimulatedHost(m, MAX_HOST, get_policy("upstream"))) as kvm:
        td = kvm.create_td()
        with td:
            caps = td.capabilities()
    inferred = module_from_capabilities(caps, get_policy("upstream"), base=m)
    assert inferred.rows == m.rows and inferred.unknown == ()


def test_progress_and_hygiene(no_fd_leak: object) -> None:
    seen: list[tuple[int, int, int]] = []
    m = load_profile("1.5.01")
    b = simulated_backend(m, MAX_HOST, get_policy("rfc-v2"))
    seam = b.seam
    assert isinstance(seam, sim.SimulatedHost)
    r = checks.run_verify(seam, backend_label="sim", given=given(b.simulation),
                          progress=lambda d, t, n: seen.append((d, t, n)))
    assert seen[-1][0] == seen[-1][1] == r.summary.total
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    assert seen[-1][2] == r.summary.tds_created > 500
    assert seam.live_tds == 0 and seam.free_key_ids == seam.key_ids
    assert r.summary.ioctls > r.summary.tds_created


# ---------------------------------------------------------------------------
# Verdicts follow the invariant: an upstream kernel with the bypass fixed passes.


BYPASS_FIXES = [f for f in FIXES if f[0] == "denylist_checks_row_index"]
WARN_FIX = "module_status_always_einval"
SET_CPUID2_FIX = "set_cpuid2_checked_against_td"
SET_CPUID2 = "set_cpuid2_consistency"


def test_the_fixes_are_what_the_suite_passes() -> None:
    assert FIXES == [(WARN_FIX, "upstream-6.16"), (WARN_FIX, "upstream"), (WARN_FIX, "rfc-v2"),
                     ("denylist_checks_row_index", "upstream"),
                     ("denylist_checks_row_index", "upstream-6.16"),
                     (SET_CPUID2_FIX, "upstream-6.16"), (SET_CPUID2_FIX, "upstream"),
                     (SET_CPUID2_FIX, "rfc-v2")]


@pytest.mark.parametrize("policy", ["upstream-6.16", "upstream", "rfc-v2"])
def test_a_kernel_that_reports_every_module_error_as_einval_passes_the_warn_check(
        capsys: pytest.CaptureFixture[str], policy: str) -> None:
    """A malformed leaf 0x1F comes back -EINVAL with TDX_CPUID_LEAF_1F_FORMAT_UNRECOGNIZED in
    hw_error, no WARN: the verdict follows the invariant (MODULE_REJECTED), so the WARN check
    passes and nothing else changes, though the mirror predicts 7.3's -EIO and WARN."""
    rc, data = run_json(capsys, "--simulate", f"2.0:{policy}:{WARN_FIX}", "--policy", policy)
    assert set(failing(data)) == baseline_failures(policy) - {WARN_CHECK}
    assert WARN_CHECK in baseline_failures(policy)
    warn = next(c for c in data["checks"] if c["id"] == WARN_CHECK)
    assert warn["status"] == "pass" and "MODULE_REJECTED" in warn["actual"], warn
    assert rc == (0 if policy == "rfc-v2" else 1)


@pytest.mark.parametrize(("mutant", "policy"), BYPASS_FIXES)
def test_upstream_with_the_bypass_fixed_passes(capsys: pytest.CaptureFixture[str], mutant: str,
                                               policy: str) -> None:
    """Predictions stay exact (the mirror's upstream ACCEPTS the bypass); the verdict follows
    the invariant, so a kernel that refuses it passes every check but the WARN (the fix
    leaves upstream's TDX_BUG_ON on a malformed leaf 0x1F as it is)."""
    rc, data = run_json(capsys, "--simulate", f"2.0:{policy}:{mutant}")
    assert set(failing(data)) == warn_failures("2.0")
    assert rc == 1
    by_id = {c["id"]: c for c in data["checks"]}
    match = by_id["adversarial_matches_prediction"]
    assert match["status"] == "pass"
    assert "stricter than the model" in match["detail"]
    assert by_id[f"{BYPASS_PREFIX}waitpkg"]["status"] == "pass"


@pytest.mark.parametrize("strict", [False, True])
def test_set_cpuid2_is_recorded_and_judged_only_with_strict(
        capsys: pytest.CaptureFixture[str], strict: bool) -> None:
    """Linux 7.3 takes a CPUID unlike the TD's on a TD vCPU (the series' open question): an
    informational result that passes, a failure with --strict; a kernel that validates it
    (the fix) is informational too, and passes --strict."""
    flag = ["--strict"] if strict else []
    rc, data = run_json(capsys, "--simulate", "2.0:rfc-v2", *flag)
    c = next(c for c in data["checks"] if c["id"] == SET_CPUID2)
    assert c["status"] == ("fail" if strict else "info"), c
    assert c["actual"] == "3 of 3 accepted" and "WAITPKG" in c["detail"]
    assert "unvalidated" in c["detail"] and data["summary"]["info"] == (0 if strict else 1)
    assert set(failing(data)) == warn_failures("2.0") | ({SET_CPUID2} if strict else set())
    assert rc == 1
    rc, data = run_json(capsys, "--simulate", f"2.0:rfc-v2:{SET_CPUID2_FIX}", *flag)
    assert rc == 1  # the WARN alone
    c = next(c for c in data["checks"] if c["id"] == SET_CPUID2)
    assert c["status"] == ("pass" if strict else "info") and c["actual"] == "0 of 3 accepted"
    assert "refused (EINVAL)" in c["detail"]
    assert set(failing(data)) == warn_failures("2.0")


# ---------------------------------------------------------------------------
# A module profile that is not this host's module is said so once, before the kernel is
# judged: not seven "kernel" failures.


def _without_sha512(tmp: Path) -> str:
    """A saved profile of module 2.0 that lists every row but SHA512 (7.1 EAX bit 0)."""
    doc = profile_to_json(load_profile("2.0"))
    for row in doc["rows"]:
        if (row["leaf"], row["subleaf"]) == ("0x7", 1):
            row["allow_direct"][0] = f"0x{int(row['allow_direct'][0], 16) & ~1:08x}"
    path = tmp / "no-sha512.json"
    path.write_text(json.dumps(doc))
    return str(path)


# 1.5-late (1.5.05) lists 18 rows: the row count tells it from 2.0 before any bit does.
@pytest.mark.parametrize(("kernel", "profile", "why"), [
    ("2.0", "1.5.01", "KVM lists 28 CPUID rows, module 1.5.01 has 12"),
    ("1.5.01", "2.0", "KVM lists 12 CPUID rows, module 2.0 has 28"),
    ("2.0", "1.5-late", "KVM lists 28 CPUID rows, module 1.5-late has 18"),
    ("2.0", "no-sha512", "never lists: 0x7.1 EAX[0] SHA512"),
])
def test_a_wrong_module_profile_is_one_failure_and_the_exact_checks_skip(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, kernel: str, profile: str,
        why: str) -> None:
    if profile == "no-sha512":
        profile = _without_sha512(tmp_path)
    rc, data = run_json(capsys, "--simulate", f"{kernel}:rfc-v2", "--module", profile)
    assert rc == 1
    fails = failing(data)
    # The WARN check needs no profile: it judges the kernel (on a topology module) still.
    assert set(fails) == {"module_profile_matches"} | warn_failures(kernel)
    assert why in fails["module_profile_matches"]["detail"]
    assert data["module"] is None and "does not match" in data["module_source"]
    by_id = {c["id"]: c for c in data["checks"]}
    assert [c["id"] for c in data["checks"][:2]] == ["tdx_available", "module_profile_matches"]
    for cid in ("caps_entries_match_prediction", "caps_header_matches_prediction",
                "adversarial_matches_prediction", "policy_value_registers_unfiltered"):
        assert by_id[cid]["status"] == "skip", cid
        assert "does not match" in by_id[cid]["detail"], cid
    # The invariant, which needs no profile, still judges the kernel.
    assert by_id["init_vm_unreported_bits_refused"]["status"] == "pass"


def test_the_right_profile_matches_and_none_given_skips(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    rc, data = run_json(capsys, "--simulate", "2.0:rfc-v2", "--module", "2.0")
    assert (rc, set(failing(data))) == (1, warn_failures("2.0"))
    check = next(c for c in data["checks"] if c["id"] == "module_profile_matches")
    assert check["status"] == "pass" and "28 rows" in check["detail"]
    m = load_profile("2.0")
    plugin = Backend(sim.SimulatedHost(m, MAX_HOST, get_policy("rfc-v2")), "plug-in")
    r = checks.run_verify(plugin.seam, backend_label="plug-in", given=given(None),
                          kernel_release="7.3.0")
    none = next(c for c in r.checks if c.id == "module_profile_matches")
    assert none.status == "skip" and "--module" in none.detail

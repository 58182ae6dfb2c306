"""The prober against the simulated host: classes equal the mirror's, bit by bit."""

from __future__ import annotations

import dataclasses
import errno

import pytest
from helpers import PassThrough, host_without

from kvmtdx import uapi
from kvmtdx.knowledge import Given
from kvmtdx.model import mirror, rules
from kvmtdx.model.policy import (
    POLICY_NAMES,
    Policy,
    allowlist_from_json,
    allowlist_to_json,
    get_policy,
)
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, Host, ModuleProfile, load_profile
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.probe import (
    BitClass,
    BitKey,
    BitResult,
    ProbeOptions,
    ProbeResult,
    TrapResult,
    effective_allowlist,
    probe,
)
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import REGISTERS, InitVm

HLE = (7, 0, "ebx", 4)
RTM = (7, 0, "ebx", 11)


def run(module: str, policy: str, mutant: str | None = None, *, host: Host = MAX_HOST,
        exhaustive: bool = False, key_ids: int = 16, jobs: int = 1,
        max_tds: int | None = None) -> tuple[ProbeResult, SimulatedHost]:
    m, p = load_profile(module), get_policy(policy)
    sim = SimulatedHost(m, host, p, mutant=mutant, key_ids=key_ids)
    result = probe(sim, ProbeOptions(exhaustive=exhaustive, jobs=jobs, max_tds=max_tds),
                   label="sim", given=Given(module=m, host=host, policy=policy))
    return result, sim


def bit_failures(result: ProbeResult) -> list[object]:
    """The failures of the bit-by-bit classification (the lookup traps aside)."""
    return [f for f in result.failures if not isinstance(f, TrapResult)]


def _with_bit(iv: InitVm, key: BitKey) -> InitVm:
    entries = list(iv.entries)
    for i, e in enumerate(entries):
        if (e.function, e.index) == key[:2]:
            entries[i] = e.with_reg(key[2], e.reg(key[2]) | 1 << key[3])
            return dataclasses.replace(iv, entries=tuple(entries))
    raise AssertionError(f"no entry for {key}")


def _hidden_class(o: Outcome) -> BitClass:
    if o.kind is Kind.ACCEPTED:
        return BitClass.HIDDEN_ACCEPTED
    if o.kind is Kind.MODULE_REJECTED or (o.kind is Kind.ERROR and o.errno == errno.EIO):
        return BitClass.HIDDEN_MODULE_REJECTED
    return BitClass.HIDDEN_KVM_REJECTED


def mirror_class(module: ModuleProfile, host: Host, policy: Policy, key: BitKey) -> BitClass:
    """The class spec section 5 gives one bit, straight from predict_init_vm (no grouping):
    a reported bit rides in the mirror's full request; a hidden one is added to it alone,
    and HLE/RTM again with their partner when the module's HLE == RTM rule refused them."""
    reported = {(e.function, e.index): e for e in mirror.reported_entries(module, host, policy)}
    base = mirror.full_request(module, host, policy).init_vm
    if reported[key[:2]].reg(key[2]) >> key[3] & 1:
        o = mirror.predict_init_vm(module, host, policy, base)
        return BitClass.REPORTED_ACCEPTED if o.kind is Kind.ACCEPTED else \
            BitClass.REPORTED_REJECTED
    cls = _hidden_class(mirror.predict_init_vm(module, host, policy, _with_bit(base, key)))
    if cls is BitClass.HIDDEN_MODULE_REJECTED and key in (HLE, RTM):
        pair = _with_bit(_with_bit(base, HLE), RTM)
        if mirror.predict_init_vm(module, host, policy, pair).kind is Kind.ACCEPTED:
            return BitClass.HIDDEN_ACCEPTED
    return cls


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_targeted_probe_classes_equal_the_mirror(module: str, policy: str) -> None:
    result, sim = run(module, policy)
    m, p = load_profile(module), get_policy(policy)
    assert result.bits, "nothing was probed"
    wrong = [(b.name, b.key, b.cls, mirror_class(m, MAX_HOST, p, b.key)) for b in result.bits
             if b.cls is not mirror_class(m, MAX_HOST, p, b.key)]
    assert not wrong
    assert not bit_failures(result) and not result.mismatches
    # Sent properly each hidden bit is refused; steered through the lookup, a policy whose
    # denylist judges the matched entry's own index lets them through.
    assert bool([t for t in result.traps if t.failed]) == (p.denylist is not None)
    assert result.complete
    assert all(f.cls.value == "FIELD_ACCEPTED" for f in result.fields)
    assert sim.live_tds == 0 and not sim.open_fds
    if m.name == "2.0":
        assert result.tds < 150


@pytest.mark.parametrize("policy", ["upstream", "rfc-v2"])
def test_exhaustive_probe_classifies_every_bit_as_the_mirror(policy: str) -> None:
    result, sim = run("2.0", policy, exhaustive=True)
    m, p = load_profile("2.0"), get_policy(policy)
    feature_regs = sum(1 for row in m.rows for r in REGISTERS
                       if not rules.is_value_register(row.leaf, row.subleaf, r))
    assert len(result.bits) == 32 * feature_regs and result.untested == 0
    assert all(b.cls is mirror_class(m, MAX_HOST, p, b.key) for b in result.bits)
    hidden = sum(1 for b in result.bits if not b.reported)
    # one TD for capabilities, one for the base request, one for GPAW 52, one per hidden bit,
    # one per lookup trap
    assert result.tds == hidden + 3 + len(result.traps)
    assert sim.live_tds == 0


def test_upstream_denylist_bits_are_hidden_and_refused_by_kvm() -> None:
    result, _ = run("2.0", "upstream")
    by_name = {b.name: b for b in result.bits}
    for name in ("HLE", "RTM", "WAITPKG"):
        assert by_name[name].cls is BitClass.HIDDEN_KVM_REJECTED
    assert by_name["MWAIT"].cls is BitClass.REPORTED_ACCEPTED
    assert by_name["CORE_CAPABILITIES"].cls is BitClass.REPORTED_ACCEPTED


def test_host_lacking_a_feature_makes_a_silently_cleared_hidden_accepted_explained() -> None:
    # AVX512F is allow_direct: without it natively, no policy reports it and the module
    # drops it without complaint.  HIDDEN_ACCEPTED, but the module's doing, not a bug.
    host = host_without("no-avx512f", {(7, 0): {"ebx": 1 << 16}})
    result, _ = run("2.0", "upstream", host=host)
    avx512f = next(b for b in result.bits if b.key == (7, 0, "ebx", 16))
    assert avx512f.cls is BitClass.HIDDEN_ACCEPTED
    assert avx512f.explained and "silently" in avx512f.explained
    assert avx512f not in result.failures


# Mutants of kvmtdx.sim that change how bits are handled, and where the probe must see them.
# rfc-v2 on 2.0 with the bundled allowlist: what the module lists that KVM's table lacks.
SERIES_HIDDEN = {
    (1, 0, "ecx", b) for b in (3, 7, 8, 10, 11, 14, 18)} | {
    (1, 0, "edx", b) for b in (18, 22, 28, 29, 31)} | {
    (7, 0, "ebx", b) for b in (4, 11, 12, 15)} | {
    (7, 0, "ecx", b) for b in (0, 5, 13)} | {
    (7, 0, "edx", 18), (7, 1, "eax", 3), (7, 1, "eax", 8), (7, 1, "edx", 17)} | {
    (0x1C, 0, "eax", b) for b in range(8)} | {
    (0x23, 0, "eax", b) for b in range(4)}

BIT_HANDLING_MUTANTS = {
    # reported without the allowlist filter, refused by INIT_VM's allowlist check
    ("caps_allowlist_unapplied", "rfc-v2"): (BitClass.REPORTED_REJECTED, SERIES_HIDDEN),
    # hidden, yet INIT_VM lets them through to the module, which takes them
    ("init_vm_allowlist_unenforced", "rfc-v2"): (BitClass.HIDDEN_ACCEPTED, SERIES_HIDDEN),
    ("allowlist_skips_row_7_1", "rfc-v2"): (BitClass.HIDDEN_ACCEPTED,
                                            {k for k in SERIES_HIDDEN if k[:2] == (7, 1)}),
    ("allowlist_skips_7_0_edx", "rfc-v2"): (BitClass.HIDDEN_ACCEPTED, {(7, 0, "edx", 18)}),
    # RTM reported although HLE is denied: RTM can never be given (HLE must equal RTM)
    ("denylist_hle_not_rtm", "upstream"): (BitClass.REPORTED_REJECTED, {RTM}),
}


@pytest.mark.parametrize(("mutant", "policy"), sorted(BIT_HANDLING_MUTANTS))
def test_bit_handling_mutant_shows_on_exactly_its_bits(mutant: str, policy: str) -> None:
    cls, keys = BIT_HANDLING_MUTANTS[(mutant, policy)]
    result, sim = run("2.0", policy, mutant)
    assert {(b.key, b.cls) for b in result.failures if isinstance(b, BitResult)} == \
        {(k, cls) for k in keys}
    assert sim.live_tds == 0


# Mutants that change a bit's class without breaking the invariant: the probe shows them
# against the mirror's expected class (a mismatch), not as a failure.
@pytest.mark.parametrize(("mutant", "policy", "keys", "got", "expected"), [
    ("core_capabilities_forgotten", "rfc-v2", {(7, 0, "edx", 30)},
     BitClass.HIDDEN_KVM_REJECTED, BitClass.REPORTED_ACCEPTED),
    # module refusals lose their status: every hidden bit the module refuses looks KVM's
    ("hw_error_not_copied", "upstream", None,
     BitClass.HIDDEN_KVM_REJECTED, BitClass.HIDDEN_MODULE_REJECTED),
    # KVM's refusals come back -EIO, which reads as the module failing the call
    ("allowlist_reject_eio", "rfc-v2", SERIES_HIDDEN,
     BitClass.HIDDEN_MODULE_REJECTED, BitClass.HIDDEN_KVM_REJECTED),
])
def test_class_changing_mutants_show_as_mismatches(mutant: str, policy: str,
                                                   keys: set[BitKey] | None, got: BitClass,
                                                   expected: BitClass) -> None:
    result, _ = run("2.0", policy, mutant)
    assert not bit_failures(result)
    assert result.mismatches
    assert all((b.cls, b.expected) == (got, expected) for b in result.mismatches)
    if keys is not None:
        assert {b.key for b in result.mismatches} == keys
    else:
        hidden_module = {b.key for b in run("2.0", policy)[0].bits
                         if b.cls is BitClass.HIDDEN_MODULE_REJECTED}
        assert {b.key for b in result.mismatches} == hidden_module


def test_mutants_outside_bit_handling_leave_the_classes_alone() -> None:
    # The probe sends only well-formed requests at GPAW 48, so a kernel that forgets to
    # force the GPAW byte in capabilities classifies every bit as a correct one does.
    result, _ = run("1.5-late", "upstream-6.16", "gpaw_not_forced")
    assert not bit_failures(result) and not result.mismatches


# ---------------------------------------------------------------------------
# The effective allowlist closes the loop.


@pytest.mark.parametrize("policy", ["upstream", "rfc-v2"])
@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_emitted_allowlist_predicts_the_probed_capabilities(module: str, policy: str) -> None:
    result, _ = run(module, policy)
    doc = allowlist_to_json(effective_allowlist(result, date="2026-01-01"))
    assert doc["provenance"].startswith("probed from sim on 2026-01-01; ")
    assert "never tried" in doc["provenance"]  # targeted: hidden bits the module cannot take
    allowlist = allowlist_from_json(doc, "emitted")
    m = load_profile(module)
    pred = mirror.predict_capabilities(m, MAX_HOST, get_policy("rfc-v2", allowlist),
                                       len(m.rows))
    assert pred.caps is not None
    assert pred.caps.entries == result.caps.entries
    assert (pred.caps.supported_attrs, pred.caps.supported_xfam) == \
        (result.caps.supported_attrs, result.caps.supported_xfam)
    # and the probed kernel answers INIT_VM as rfc-v2 with that table would, bit by bit
    rfc = get_policy("rfc-v2", allowlist)
    for b in result.bits:
        assert b.cls is mirror_class(m, MAX_HOST, rfc, b.key), b


def test_emitted_allowlist_leaves_out_bits_kvm_refuses() -> None:
    result, _ = run("2.0", "rfc-v2", "caps_allowlist_unapplied")
    allowlist = effective_allowlist(result, date="d")
    assert not allowlist.mask(1, 0, "ecx") >> 3 & 1  # MWAIT: reported, but KVM refuses it
    assert allowlist.mask(1, 0, "ecx") >> 28 & 1  # AVX
    assert allowlist.is_passthrough(4, 2, "ebx")


# ---------------------------------------------------------------------------
# Key IDs, budget, parallelism.


def test_small_key_id_supply_never_runs_out() -> None:
    result, sim = run("2.0", "rfc-v2", key_ids=1)
    assert result.complete and not result.failures
    assert sim.live_tds == 0 and sim.free_key_ids == 1


def test_parallel_jobs_on_a_small_supply_retry_instead_of_failing() -> None:
    serial, _ = run("2.0", "upstream")
    parallel, sim = run("2.0", "upstream", key_ids=2, jobs=4)
    assert [(b.key, b.cls) for b in parallel.bits] == [(b.key, b.cls) for b in serial.bits]
    assert sim.live_tds == 0 and sim.free_key_ids == 2
    assert any("--jobs 4" in n for n in parallel.notes)


class _Tally(PassThrough):
    """The seam as the probe sees it, counted from outside the device layer."""

    def __init__(self, inner: SimulatedHost) -> None:
        super().__init__(inner)
        self.ioctls = 0
        self.tds = 0

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        self.ioctls += 1  # the probe serialises seams other than the real device
        ret = super().ioctl(fd, request, arg)
        if request == uapi.Ioctl.KVM_CREATE_VM and arg == uapi.VmType.KVM_X86_TDX_VM:
            self.tds += 1
        return ret


@pytest.mark.parametrize("jobs", [1, 4])
def test_counts_are_the_device_layers_and_match_what_reached_the_seam(jobs: int) -> None:
    m, p = load_profile("2.0"), get_policy("upstream")
    tally = _Tally(SimulatedHost(m, MAX_HOST, p, key_ids=3))
    result = probe(tally, ProbeOptions(jobs=jobs), label="sim",
                   given=Given(module=m, host=MAX_HOST, policy="upstream"))
    assert (result.ioctls, result.tds) == (tally.ioctls, tally.tds)
    assert result.tds > 50 and result.ioctls > 2 * result.tds


def test_supply_exhausted_by_another_holder_fails_cleanly() -> None:
    from kvmtdx.device import Kvm
    from kvmtdx.errors import ProbeError

    m, p = load_profile("2.0"), get_policy("upstream")
    sim = SimulatedHost(m, MAX_HOST, p, key_ids=2)
    kvm = Kvm(sim)
    held = [kvm.create_td() for _ in range(2)]
    try:
        for td in held:
            assert td.init_vm(mirror.full_request(m, MAX_HOST, p).init_vm).kind is Kind.ACCEPTED
        assert sim.free_key_ids == 0
        with pytest.raises(ProbeError, match=r"key IDs exhausted.*all are closed"):
            probe(sim, ProbeOptions(), label="sim",
                  given=Given(module=m, host=MAX_HOST, policy="upstream"))
        assert sim.live_tds == 2  # only the holder's TDs are left
    finally:
        for td in held:
            td.close()
        kvm.close()
    assert sim.live_tds == 0 and not sim.open_fds


def test_leaking_kernel_stops_the_probe_with_one_clear_error() -> None:
    from kvmtdx.errors import ProbeError

    with pytest.raises(ProbeError, match="ENOSPC"):
        run("2.0", "upstream", "key_id_leak_on_failure", key_ids=4)


def test_max_tds_bounds_the_run_and_says_it_is_incomplete() -> None:
    result, sim = run("2.0", "rfc-v2", max_tds=10)
    assert result.tds == 10
    assert not result.complete
    assert any("--max-tds 10" in n for n in result.notes)
    assert sim.live_tds == 0


# ---------------------------------------------------------------------------
# Without the policy (binary splitting does the work) and without any profile.


def test_binary_splitting_finds_every_refused_reported_bit() -> None:
    m, p = load_profile("2.0"), get_policy("rfc-v2")
    sim = SimulatedHost(m, MAX_HOST, p, mutant="caps_allowlist_unapplied")
    # No policy: nothing marks the suspects, so the base request fails and is split.
    result = probe(sim, ProbeOptions(), label="sim",
                   given=Given(module=m, host=MAX_HOST, policy=None))
    refused = {b.key for b in result.bits if b.cls is BitClass.REPORTED_REJECTED}
    assert refused == SERIES_HIDDEN
    assert {b.key for b in result.failures if isinstance(b, BitResult)} == SERIES_HIDDEN
    accepted = [b for b in result.bits if b.cls is BitClass.REPORTED_ACCEPTED]
    assert len(accepted) == 57  # the allowlisted bits the module lists on this host
    assert all(b.outcome is not None and b.outcome.kind is Kind.ACCEPTED for b in accepted)
    # splitting costs more than trying the suspects alone, but far less than one TD a bit
    assert 104 < result.tds < 104 + 4 * len(SERIES_HIDDEN)
    assert sim.live_tds == 0


def test_probe_without_any_profile_is_exhaustive_and_matches_the_mirror() -> None:
    m, p = load_profile("1.5.01"), get_policy("upstream")
    sim = SimulatedHost(m, MAX_HOST, p)
    result = probe(sim, ProbeOptions(exhaustive=True), label="sim", given=Given(policy=None))
    assert result.untested == 0 and not bit_failures(result)
    assert all(b.cls is mirror_class(m, MAX_HOST, p, b.key) for b in result.bits)
    assert all(b.expected is None and b.cleared is None for b in result.bits)


def test_the_mirrors_couplings_are_what_the_prober_keeps() -> None:
    # HLE == RTM is the one coupling left: the module overwrites PKS with ATTRIBUTES.PKS
    # instead of refusing it (tdh_mng_init.c), so PKS is no coupling.
    (hle_rtm,) = rules.MODULE_COUPLINGS
    both = 1 << 4 | 1 << 11
    assert hle_rtm.broken(1 << 4) and not hle_rtm.broken(both) and not hle_rtm.broken(0)
    assert hle_rtm.met(both) == both and hle_rtm.met(both, tsx_ctrl=False) == 0
    assert hle_rtm.met(1 << 11 | 1) == 1
    assert rules.coupling_of(7, 0, "ecx", 31) is None
    # A kernel that reports RTM but hides HLE: without the policy, nothing but the coupling
    # explains why the module refuses RTM, and the prober names it.
    m = load_profile("2.0")
    sim = SimulatedHost(m, MAX_HOST, get_policy("upstream"), mutant="denylist_hle_not_rtm")
    result = probe(sim, ProbeOptions(), label="sim", given=Given(module=m, policy=None))
    rtm = next(b for b in result.bits if b.key == RTM)
    assert rtm.cls is BitClass.REPORTED_REJECTED
    assert rtm.explained == ("module coupling: HLE and RTM must be equal on the TD's final "
                             "values, and the other is not reported")
    assert rtm not in result.failures


def test_bits_cleared_under_this_xfam_are_accepted_and_say_so() -> None:
    # A host KVM without AVX-512 state: KVM still reports the AVX-512 bits the CPU has, and
    # the module takes a request carrying them and clears them under an XFAM without
    # AVX-512 state (apply_cpuid_xfam_masks): accepted, cleared, not refused.
    m, p = load_profile("2.0"), get_policy("upstream")
    host = dataclasses.replace(MAX_HOST, name="no-avx512-state", kvm_xfam=0x207)
    sim = SimulatedHost(m, host, p)
    result = probe(sim, ProbeOptions(), label="sim",
                   given=Given(module=m, host=host, policy=p.name))
    assert not [b for b in result.bits if b.cls is BitClass.REPORTED_REJECTED]
    by_name = {b.name: b for b in result.bits if b.reported}
    for name in ("AVX512F", "AVX512VL", "AVX512_VNNI"):
        b = by_name[name]
        assert b.cls is BitClass.REPORTED_ACCEPTED
        assert b.cleared is not None and b.cleared.startswith("accepted, cleared") \
            and "XFAM" in b.cleared
    assert by_name["BMI1"].cleared is None
    assert not bit_failures(result)

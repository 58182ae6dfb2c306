"""The mirror and the simulated host, written independently from the same contract, must agree.

Hypothesis draws module / host combinations and thousands of requests, with the
strategies `kvmtdx fuzz` uses (kvmtdx.fuzz.strategies): valid requests with bits of
every class added, find() traps (unflagged, steered, duplicated, reordered entries),
malformed headers, lying nent, non-zero cmd words.
Capabilities must match byte for byte (the caller's whole buffer afterwards),
INIT_VM on outcome kind, errno and hw_error.  A disagreement means one of the
two readings of the contract is wrong.
"""

from __future__ import annotations

import errno
import functools
from dataclasses import replace

from helpers import bypass, host_without
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmtdx import layout
from kvmtdx.device import Kvm
from kvmtdx.fuzz import strategies as fuzz_strategies
from kvmtdx.fuzz.ground import Ground, ground
from kvmtdx.layout import init_vm_bytes
from kvmtdx.model import lifecycle, mirror
from kvmtdx.model.policy import Policy, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, Host, ModuleProfile, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Outcome
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import (
    FLAG_SIGNIFICANT_INDEX,
    Capabilities,
    CpuidEntry,
    InitVm,
)

# Each example checks a batch of requests on one module/host combination: the
# per-example cost of hypothesis itself is what bounds the run time.
BATCH = 3
CASES_PER_POLICY = 2100
SETTINGS = settings(
    max_examples=CASES_PER_POLICY // BATCH,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# A host with some features, 4-level EPT only, no TSX_CTRL and a narrow XFAM.
_PARTIAL_NATIVE = {
    (1, None): (0x000906EA, 0x00100800, 0x7FFAFBBF, 0xBFEBFBFF),
    (7, 0): (0, 0x029C6FBF, 0x40000000, 0xBC000400),
    (7, 1): (0x00000010, 0, 0, 0),
    (0x80000008, None): (0x00003027, 0x00000200, 0, 0),
}
HOSTS: dict[str, Host] = {
    "max": MAX_HOST,
    "partial": replace(MAX_HOST, name="partial", native={**MAX_HOST.native, **_PARTIAL_NATIVE},
                       kvm_xfam=0x2E7, ept_5level=False, tsx_ctrl=False),
    # Lacks an XFAM bit every module fixes to 1: KVM reports nothing (EIO).
    "no-x87": replace(MAX_HOST, name="no-x87", native={**MAX_HOST.native, **_PARTIAL_NATIVE},
                      kvm_xfam=0x2E6, ept_5level=True, tsx_ctrl=True),
    # No TSX at all (HLE and RTM absent, no TSX_CTRL): the module's final-value rule sees 0s.
    "no-tsx": host_without("no-tsx", {(7, 0): {"ebx": 1 << 4 | 1 << 11}}, tsx_ctrl=False),
}


@functools.cache
def combo(module: str, host: str, policy: str) -> tuple[ModuleProfile, Host, SimulatedHost]:
    m, h = load_profile(module), HOSTS[host]
    return m, h, SimulatedHost(m, h, get_policy(policy), key_ids=4)


@functools.cache
def base_request(module: str, host: str, policy: str) -> Request:
    m, h, _ = combo(module, host, policy)
    return mirror.full_request(m, h, get_policy(policy))


@functools.cache
def ground_of(module: str, host: str, policy: str) -> Ground:
    """What the package's request strategies draw from, for the mirror's capabilities."""
    m, h, _ = combo(module, host, policy)
    p = policy_named(policy)
    return ground(mirror.reported_entries(m, h, p), mirror.supported_attrs(m),
                  mirror.supported_xfam(m, h), m, h)


@functools.cache
def request_strategy(module: str, host: str, policy: str) -> st.SearchStrategy[Request]:
    # Built once per combination: building a strategy costs more than drawing from it.
    return fuzz_strategies.requests(ground_of(module, host, policy))


@st.composite
def requests(draw: st.DrawFn, module: str, host: str, policy: str) -> tuple[Request, bytes]:
    """A request (kvmtdx.fuzz.strategies: every domain `kvmtdx fuzz` draws from) and the
    exact bytes sent (a lying nent gets zeroed room behind it)."""
    req = draw(request_strategy(module, host, policy))
    return req, init_vm_bytes(req.init_vm)


def _answer(sim: SimulatedHost, data: bytes, req: Request, second: bool) -> Outcome:
    with Kvm(sim) as kvm, kvm.create_td() as td:
        if second:
            first = td.init_vm(base_request(*_key(sim)).init_vm)
            assert first.kind.value == "ACCEPTED", first
        return td.init_vm(data, flags=req.flags, hw_error=req.hw_error)


def _key(sim: SimulatedHost) -> tuple[str, str, str]:
    return sim.module.name, sim.host.name, sim.policy.name


Case = tuple[str, str, str, Request, bytes, bool]
MODULE = st.sampled_from(BUNDLED_MODULES)
HOST = st.sampled_from(sorted(HOSTS))
SECOND = st.integers(0, 15)


@st.composite
def init_vm_cases(draw: st.DrawFn, policy: str) -> list[Case]:
    module = draw(MODULE)
    host = draw(HOST)
    out: list[Case] = []
    for _ in range(BATCH):
        req, data = draw(requests(module, host, policy))
        # Now and then the request goes to a TD that a valid INIT_VM initialised.
        second = host == "max" and draw(SECOND) == 15
        out.append((module, host, policy, req, data, second))
    return out


@functools.cache
def policy_named(name: str) -> Policy:
    return get_policy(name)


def check_init_vm(cases: list[Case]) -> None:
    for module, host, policy, req, data, second in cases:
        m, h, sim = combo(module, host, policy)
        predicted = mirror.predict_init_vm(m, h, policy_named(policy), req,
                                           td_initialized=second)
        got = _answer(sim, data, req, second)
        assert got.same_answer(predicted), (
            f"{module}/{host}/{policy}: sim {got.describe()} but mirror {predicted.describe()}"
        )
        assert sim.live_tds == 0 and sim.free_key_ids == 4


@SETTINGS
@given(init_vm_cases("upstream"))
def test_init_vm_agrees_upstream(cases: list[Case]) -> None:
    check_init_vm(cases)


@SETTINGS
@given(init_vm_cases("upstream-6.16"))
def test_init_vm_agrees_upstream_6_16(cases: list[Case]) -> None:
    check_init_vm(cases)


@SETTINGS
@given(init_vm_cases("rfc-v2"))
def test_init_vm_agrees_rfc_v2(cases: list[Case]) -> None:
    check_init_vm(cases)


# ---------------------------------------------------------------------------
# KVM_TDX_CAPABILITIES, byte for byte.


u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def caller_buffers(draw: st.DrawFn) -> tuple[int, bytes, int, int]:
    """(nent, the caller's buffer before the call, cmd.flags, cmd.hw_error)."""
    nent = draw(st.sampled_from([0, 1, 6, 11, 12, 13, 27, 28, 29, 40, 256]))
    garbage = draw(st.booleans())
    word = st.integers(0, 2**64 - 1) if garbage else st.just(0)
    room_entries = tuple(
        CpuidEntry(function=draw(u32), eax=draw(u32), padding=(draw(u32), 0, 0))
        for _ in range(min(nent, 3) if garbage else 0)
    )
    caller = Capabilities(
        supported_attrs=draw(word), supported_xfam=draw(word),
        kernel_tdvmcallinfo_1_r11=draw(word), user_tdvmcallinfo_1_r11=draw(word),
        kernel_tdvmcallinfo_1_r12=draw(word), user_tdvmcallinfo_1_r12=draw(word),
        reserved=tuple(draw(word) if k % 97 == 0 else 0 for k in range(250)),
        nent=nent, cpuid_padding=draw(word) & 0xFFFFFFFF, entries=room_entries,
    )
    buf = layout.pack_capabilities(caller, nent_room=nent)
    flags = draw(st.sampled_from([0] * 6 + [1, 0x80000000]))
    hw_error = draw(st.sampled_from([0] * 6 + [1, 2**63]))
    return nent, buf, flags, hw_error


CapsCase = tuple[str, str, str, list[tuple[int, bytes, int, int]]]


@st.composite
def caps_cases(draw: st.DrawFn, policy: str) -> CapsCase:
    return (draw(MODULE), draw(HOST), policy, [draw(caller_buffers()) for _ in range(BATCH)])


def check_caps(case: CapsCase) -> None:
    module, host, policy, buffers = case
    m, h, sim = combo(module, host, policy)
    for nent, buf, flags, hw_error in buffers:
        predicted = mirror.predict_capabilities(m, h, policy_named(policy), nent, flags=flags,
                                                hw_error=hw_error, caller=buf)
        with Kvm(sim) as kvm, kvm.create_td() as td:
            got = td.capabilities_raw(nent, flags=flags, hw_error=hw_error, fill=buf)
        want = buf if predicted.buffer is None else predicted.buffer
        assert got.errno == predicted.errno, f"{module}/{host}/{policy} nent {nent}"
        assert got.data == want, f"{module}/{host}/{policy} nent {nent}: buffers differ"
        assert got.cmd.hw_error == hw_error  # CAPABILITIES never reports a module status
        assert sim.live_tds == 0


CAPS_SETTINGS = settings(max_examples=600 // BATCH, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])


@CAPS_SETTINGS
@given(caps_cases("upstream"))
def test_capabilities_agree_upstream(case: CapsCase) -> None:
    check_caps(case)


@CAPS_SETTINGS
@given(caps_cases("upstream-6.16"))
def test_capabilities_agree_upstream_6_16(case: CapsCase) -> None:
    check_caps(case)


@CAPS_SETTINGS
@given(caps_cases("rfc-v2"))
def test_capabilities_agree_rfc_v2(case: CapsCase) -> None:
    check_caps(case)


def test_the_draws_reach_every_kind_of_answer() -> None:
    """The generator is not stuck on one outcome: each kind occurs across a sample."""
    kinds: set[str] = set()
    checks: set[str] = set()

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(init_vm_cases("upstream"))
    def sample(cases: list[Case]) -> None:
        for module, host, policy, req, _, second in cases:
            m, h, _ = combo(module, host, policy)
            o = mirror.predict_init_vm(m, h, policy_named(policy), req, td_initialized=second)
            kinds.add(o.kind.value)
            checks.add(o.check or "")

    sample()
    assert kinds == {"ACCEPTED", "KVM_REJECTED", "MODULE_REJECTED", "ERROR"}, kinds
    assert len(checks) >= 10, checks


def test_init_vm_bypass_request_is_accepted_by_both_on_upstream() -> None:
    """The spec's worked example, end to end through both readings."""
    m, h, sim = combo("2.0", "max", "upstream")
    base = base_request("2.0", "max", "upstream").init_vm
    rest = tuple(e for e in base.entries if e.function != 7)
    iv = InitVm(attributes=base.attributes, xfam=base.xfam, entries=(
        CpuidEntry(function=7, index=1, flags=FLAG_SIGNIFICANT_INDEX),
        CpuidEntry(function=7, index=2, flags=FLAG_SIGNIFICANT_INDEX),
        CpuidEntry(function=7, index=5, ecx=1 << 5),
        *rest,
    ))
    req = Request(init_vm=iv)
    assert mirror.predict_init_vm(m, h, get_policy("upstream"), req).kind.value == "ACCEPTED"
    assert _answer(sim, layout.pack_init_vm(iv), req, False).kind.value == "ACCEPTED"


# ---------------------------------------------------------------------------
# Several INIT_VM calls on one TD: what each call leaves behind (kvmtdx.model.lifecycle).

SEQUENCE_SETTINGS = settings(max_examples=400 // BATCH, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.data_too_large])
SequenceCase = tuple[str, str, str, list[tuple[Request, bytes]]]


@st.composite
def sequence_cases(draw: st.DrawFn, policy: str) -> SequenceCase:
    """One module/host and two to four requests for one TD; now and then a valid one in
    between, so a sequence reaches an initialised TD after refusals."""
    module, host = draw(MODULE), draw(HOST)
    calls = []
    for _ in range(draw(st.integers(2, 4))):
        if draw(st.integers(0, 3)) == 0:
            req = base_request(module, host, policy)
            calls.append((req, layout.pack_init_vm(req.init_vm)))
        else:
            calls.append(draw(requests(module, host, policy)))
    return module, host, policy, calls


def check_sequence(case: SequenceCase) -> None:
    module, host, policy, calls = case
    m, h, sim = combo(module, host, policy)
    predicted = lifecycle.predict_sequence(m, h, policy_named(policy), [r for r, _ in calls])
    with Kvm(sim) as kvm:
        with kvm.create_td() as fresh:
            fresh_caps = fresh.capabilities_raw(64)
        with kvm.create_td() as td:
            for k, ((req, data), want) in enumerate(zip(calls, predicted.outcomes, strict=True)):
                got = td.init_vm(data, flags=req.flags, hw_error=req.hw_error)
                assert got.same_answer(want), (
                    f"{module}/{host}/{policy} call {k + 1}: sim {got.describe()} but mirror "
                    f"{want.describe()} (states {[s.value for s in predicted.states]})")
            caps = td.capabilities_raw(64)
    assert caps.errno == (lifecycle.caps_errno_in(predicted.final) or fresh_caps.errno)
    if caps.errno == 0:
        assert caps.data == fresh_caps.data
    assert sim.live_tds == 0 and sim.free_key_ids == 4


@SEQUENCE_SETTINGS
@given(sequence_cases("upstream"))
def test_init_vm_sequences_agree_upstream(case: SequenceCase) -> None:
    check_sequence(case)


@SEQUENCE_SETTINGS
@given(sequence_cases("upstream-6.16"))
def test_init_vm_sequences_agree_upstream_6_16(case: SequenceCase) -> None:
    check_sequence(case)


@SEQUENCE_SETTINGS
@given(sequence_cases("rfc-v2"))
def test_init_vm_sequences_agree_rfc_v2(case: SequenceCase) -> None:
    check_sequence(case)


def _tsx_bypass_then_valid(policy: str) -> tuple[lifecycle.SequencePrediction, list[int]]:
    """On a host without TSX_CTRL, HLE+RTM smuggled past the denylist make TDH.MNG.INIT fail
    with a status that is not an operand's (-EIO); then a valid request and capabilities."""
    m, h, sim = combo("2.0", "partial", policy)
    valid = base_request("2.0", "partial", policy)
    tsx = Request(init_vm=bypass(valid.init_vm, ebx=1 << 4 | 1 << 11, ecx=0))
    predicted = lifecycle.predict_sequence(m, h, policy_named(policy), [tsx, valid])
    with Kvm(sim) as kvm, kvm.create_td() as td:
        got = [td.init_vm(tsx.init_vm).errno, td.init_vm(valid.init_vm).errno,
               td.capabilities_raw(64).errno]
    return predicted, got


def test_a_module_error_kills_the_vm_from_linux_6_19_on() -> None:
    predicted, got = _tsx_bypass_then_valid("upstream")
    assert [o.errno for o in predicted.outcomes] == got[:2] == [errno.EIO, errno.EIO]
    assert predicted.final is lifecycle.TdState.DEAD and got[2] == errno.EIO


def test_linux_6_16_only_warns_on_a_module_error() -> None:
    predicted, got = _tsx_bypass_then_valid("upstream-6.16")
    assert [o.errno for o in predicted.outcomes] == got[:2] == [errno.EIO, 0]
    assert predicted.final is lifecycle.TdState.INITIALIZED and got[2] == 0


def test_the_sequence_draws_reach_a_retry_after_each_kind_of_refusal() -> None:
    """The sequences are not all refusals: a TD is initialised after KVM refused it and after
    the module refused it, and refused once initialised."""
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(sequence_cases("upstream"))
    def sample(case: SequenceCase) -> None:
        module, host, policy, calls = case
        m, h, _ = combo(module, host, policy)
        p = lifecycle.predict_sequence(m, h, policy_named(policy), [r for r, _ in calls])
        kinds = [o.kind.value for o in p.outcomes]
        for k in range(1, len(kinds)):
            if kinds[k] == "ACCEPTED":
                seen.add(f"ACCEPTED after {kinds[k - 1]}")
            if p.states[k - 1] is lifecycle.TdState.INITIALIZED:
                seen.add(f"{kinds[k]} when initialised")

    sample()
    assert {"ACCEPTED after KVM_REJECTED", "ACCEPTED after MODULE_REJECTED",
            "KVM_REJECTED when initialised"} <= seen, seen

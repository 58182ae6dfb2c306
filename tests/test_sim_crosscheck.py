"""The mirror and the simulated host, written independently from the same contract, must agree.

Hypothesis draws module / host combinations and thousands of requests: valid
full requests with bits flipped, find() traps (unflagged, duplicated,
reordered entries), malformed headers, lying nent, non-zero cmd words.
Capabilities must match byte for byte (the caller's whole buffer afterwards),
INIT_VM on outcome kind, errno and hw_error.  A disagreement means one of the
two readings of the contract is wrong.
"""

from __future__ import annotations

import errno
import functools
from dataclasses import replace

from helpers import bypass, host_without, with_bypass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmtdx import layout
from kvmtdx.device import Kvm
from kvmtdx.model import builders, lifecycle, mirror
from kvmtdx.model.policy import Policy, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, Host, ModuleProfile, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Outcome
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import (
    FLAG_SIGNIFICANT_INDEX,
    KVM_MAX_CPUID_ENTRIES,
    REGISTERS,
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


# Strategies are built once: constructing them inside the composite costs more
# than the simulated kernel and the mirror together.
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
bit = st.integers(0, 31)
pick = st.integers(0, 2**16)  # an index, taken modulo the length at hand
OPS = st.lists(st.sampled_from([
    "flip", "flip", "flip", "flip", "module_bit", "module_bit", "module_bit", "deny",
    "module_row", "flag", "index", "function",
    "drop", "dup", "trap", "swap", "bypass", "attributes", "xfam", "gpaw", "fms",
    "reserved", "padding", "entry_padding", "mr", "flags", "hw_error",
    "reverse", "flag_bits", "steer", "steer", "realistic", "measure",
    "xfam_set", "xfam_set", "topology", "topology",
]), max_size=4)
# Request shapes the verify suite's accepting checks send (kvmtdx.model.builders).
SHAPE_OPS = frozenset({"reverse", "flag_bits", "steer", "realistic", "measure"})
FLAG_BITS = st.sampled_from([2, 4, 6, 0x80000000])
ENTRY_OPS = frozenset({"flip", "module_bit", "deny", "module_row", "flag", "index", "function",
                       "drop", "dup", "swap", "entry_padding"})
REG = st.sampled_from(REGISTERS)
INDEX = st.sampled_from([0, 1, 2, 5, 0xFFFFFFFF])
FUNCTION = st.sampled_from([0, 1, 4, 7, 0xD, 0x1E, 0x24, 0x80000001, 0x80000008])
TRAP_INDEX = st.sampled_from([0, 1, 3, 5])
TRAP_FLAGS = st.sampled_from([0, FLAG_SIGNIFICANT_INDEX])
TSX = st.sampled_from([0, 1 << 4, 1 << 11, 1 << 4 | 1 << 11])
WAITPKG = st.sampled_from([0, 1 << 5])
ATTRIBUTES = st.one_of(st.sampled_from([0, 1 << 28, 1 << 30, 1 << 28 | 1 << 30, 1, 1 << 63]),
                       st.integers(0, 63).map(lambda b: 1 << b))
BIT64 = st.integers(0, 63)
GPAW = st.sampled_from([48, 52, 0, 39, 57, 0xFF])
LIE = st.sampled_from([None] * 8 + ["down", "up", "huge"])
HUGE = st.sampled_from([257, 1000, 0x80000000, 0xFFFFFFFF])
# XFAM values check_xfam judges: AVX-512 with and without AVX, parts of it, CET and AMX
# halves, PT, LBR, and what a host supports whole.
XFAM_SET = st.sampled_from([0x3, 0x7, 0x23, 0x43, 0xE3, 0xE7, 0x20003, 0x40003, 0x60003,
                            0x60007, 0x803, 0x1003, 0x1803, 0x103, 0x8003, 0x2E7, 0x6DBE7])
# Leaf 0x1F sub-leaves (EAX shift, EBX count, ECX level type << 8 | level number): valid
# SMT+core, all zero (the host's), zero then set, types not rising, no core, a level number
# that is not its sub-leaf (2.0 refuses it).
Level = tuple[int, int, int, int | None]
LEVEL: st.SearchStrategy[Level] = st.tuples(
    st.integers(0, 31), st.sampled_from([0, 1, 2, 0x70]), st.sampled_from([0, 1, 2, 3, 5, 6]),
    st.sampled_from([None, 0, 1, 4]))
SMT_CORE: list[Level] = [(1, 2, 1, None), (7, 0x70, 2, None)]
TOPOLOGY: st.SearchStrategy[list[Level]] = st.one_of(
    st.just(list[Level]()), st.just(SMT_CORE), st.lists(LEVEL, max_size=6))
NONZERO64 = st.integers(1, 2**64 - 1)
NONZERO32 = st.integers(1, 0xFFFFFFFF)


@st.composite
def requests(draw: st.DrawFn, module: str, host: str, policy: str) -> tuple[Request, bytes]:
    """A request and the exact bytes sent (a lying nent gets zeroed room behind it)."""
    m, h, _ = combo(module, host, policy)
    base = base_request(module, host, policy)
    iv = base.init_vm
    entries = list(iv.entries)
    flags, hw_error = 0, 0
    for op in draw(OPS):
        if op in ENTRY_OPS and not entries:
            continue
        i = draw(pick) % max(1, len(entries))
        if op == "flip":
            r = draw(REG)
            e = entries[i]
            entries[i] = e.with_reg(r, e.reg(r) ^ 1 << draw(bit))
        elif op == "module_bit":
            # A bit the module takes in this entry's row: reported or hidden by KVM.
            e = entries[i]
            k = m.row_index(e.function, None if e.function in (1, 0xA, 0x1C, 0x19, 0x80000008)
                            else e.index)
            if k is not None:
                r = draw(REG)
                allowed = m.rows[k].module_allows()[REGISTERS.index(r)]
                bits = [b for b in range(32) if allowed >> b & 1]
                if bits:
                    entries[i] = e.with_reg(r, e.reg(r) | 1 << bits[draw(pick) % len(bits)])
        elif op == "deny":
            hit = [k for k, x in enumerate(entries) if x.function == 7]
            if hit:
                e = entries[hit[0]]
                entries[hit[0]] = replace(e, ebx=e.ebx | draw(TSX), ecx=e.ecx | draw(WAITPKG))
        elif op == "module_row":
            row = m.rows[draw(pick) % len(m.rows)]
            a, b, c, d = row.module_allows()
            entries[i] = replace(entries[i], function=row.leaf, index=row.kvm_index,
                                 eax=a, ebx=b, ecx=c, edx=d)
        elif op == "flag":
            entries[i] = replace(entries[i], flags=entries[i].flags ^ FLAG_SIGNIFICANT_INDEX)
        elif op == "index":
            entries[i] = replace(entries[i], index=draw(INDEX))
        elif op == "function":
            entries[i] = replace(entries[i], function=draw(FUNCTION))
        elif op == "drop":
            del entries[i]
        elif op == "dup":
            entries.insert(draw(pick) % (len(entries) + 1), entries[i])
        elif op == "trap":
            # An unflagged leaf 7 entry matches every leaf 7 row it reaches first.
            entries.insert(draw(pick) % (len(entries) + 1), CpuidEntry(
                function=7, index=draw(TRAP_INDEX), flags=draw(TRAP_FLAGS),
                ebx=draw(TSX), ecx=draw(WAITPKG), edx=draw(u32) & draw(u32)))
        elif op == "swap":
            j = draw(pick) % len(entries)
            entries[i], entries[j] = entries[j], entries[i]
        elif op == "bypass":
            # Spec section 4: flagged 7.1 and 7.2 first, then an unflagged index 5 with
            # WAITPKG or HLE+RTM, which lands on row 7.0 behind the denylist's back.
            entries = list(with_bypass(entries, ebx=draw(TSX), ecx=draw(WAITPKG)))
        elif op == "attributes":
            iv = replace(iv, attributes=draw(ATTRIBUTES))
        elif op == "xfam":
            iv = replace(iv, xfam=iv.xfam ^ 1 << draw(BIT64))
        elif op == "xfam_set":
            iv = replace(iv, xfam=draw(XFAM_SET))
        elif op == "topology":
            entries = _topology(entries, draw(TOPOLOGY))
        elif op == "gpaw":
            g = draw(GPAW)
            hit = [k for k, x in enumerate(entries) if x.function == 0x80000008]
            if hit:
                e = entries[hit[0]]
                entries[hit[0]] = replace(e, eax=(e.eax & ~0xFF0000) | g << 16)
        elif op == "fms":
            hit = [k for k, x in enumerate(entries) if x.function == 1]
            if hit:
                fms = (0, h.native_fms(), 0x000806F8, 0x00050654)[draw(pick) % 4]
                entries[hit[0]] = replace(entries[hit[0]], eax=fms)
        elif op == "reserved":
            words = list(iv.reserved)
            words[draw(pick) % 12] = draw(NONZERO64)
            iv = replace(iv, reserved=tuple(words))
        elif op == "padding":
            iv = replace(iv, cpuid_padding=draw(NONZERO32))
        elif op == "entry_padding":
            entries[i] = replace(entries[i], padding=(draw(u32), 0, 0))
        elif op == "mr":
            iv = replace(iv, mrowner=(draw(u64),) * 6)
        elif op in SHAPE_OPS:
            iv = replace(iv, entries=tuple(entries))
            iv = _shaped(draw, op, module, host, policy, iv)
            entries = list(iv.entries)
        elif op == "flags":
            flags = draw(NONZERO32)
        elif op == "hw_error":
            hw_error = draw(NONZERO64)
    iv = replace(iv, entries=tuple(entries))
    lie = draw(LIE)
    if lie == "down" and entries:
        iv = replace(iv, nent=draw(pick) % len(entries))
    elif lie == "up":
        iv = replace(iv, nent=len(entries) + 1 + draw(pick) % (256 - len(entries)))
    elif lie == "huge":
        iv = replace(iv, nent=draw(HUGE))
    data = layout.pack_init_vm(iv)
    if iv.nent is not None and len(entries) < iv.nent <= KVM_MAX_CPUID_ENTRIES:
        # The kernel reads nent entries; the mirror models the room as zeroed.
        data += bytes((iv.nent - len(entries)) * layout.SIZEOF_CPUID_ENTRY2)
    return Request(init_vm=iv, flags=flags, hw_error=hw_error), data


def _topology(entries: list[CpuidEntry], levels: list[Level]) -> list[CpuidEntry]:
    """`entries` with every 0x1F entry set from `levels` (sub-leaf s gets levels[s], zeros
    past the list); a level number of None is the sub-leaf itself."""
    out = []
    for e in entries:
        if e.function == 0x1F and e.index < 6:
            shift, count, kind, number = levels[e.index] if e.index < len(levels) else (0,) * 4
            level = (e.index if number is None else number) if kind else 0
            e = replace(e, eax=shift, ebx=count, ecx=kind << 8 | level, edx=0)
        out.append(e)
    return out


def _shaped(draw: st.DrawFn, op: str, module: str, host: str, policy: str,
            iv: InitVm) -> InitVm:
    """`iv` in one of the shapes verify's accepting checks send, on whatever it holds now."""
    m, h, _ = combo(module, host, policy)
    req = Request(init_vm=iv)
    reported = mirror.reported_entries(m, h, policy_named(policy))
    if op == "reverse":
        req = builders.reversed_order(req)
    elif op == "flag_bits":
        req = builders.with_flag_bits(req, draw(FLAG_BITS))
    elif op == "realistic":
        req = builders.realistic_values(req, reported, fms=h.native_fms() ^ draw(st.integers(0, 1)))
    elif op == "measure":
        req = builders.with_measurements(req)
    else:
        rows = [(leaf, i) for leaf, ix in builders.multi_row_leaves(reported).items() for i in ix]
        if rows:
            leaf, i = rows[draw(pick) % len(rows)]
            e = next((x for x in iv.entries if (x.function, x.index) == (leaf, i)), None)
            regs = list(e.regs() if e is not None else (0, 0, 0, 0))
            r, k = draw(st.integers(0, 3)), m.row_index(leaf, i)
            if k is not None:  # a bit the module takes, reported or not
                regs[r] |= m.rows[k].module_allows()[r] & draw(u32)
            req = builders.steered(req, reported, leaf, i, regs)
    return req.init_vm


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

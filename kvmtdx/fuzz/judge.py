"""Holding what a backend answered to a scenario against the mirror, as spec section 5 judges.

Pure code.  Each call's answer is compared with the exact prediction for the TD's state at
that point (kvmtdx.model.lifecycle): an INIT_VM by outcome kind, errno and hw_error; a
KVM_TDX_CAPABILITIES by errno and the caller's whole buffer afterwards; and, where the
backend counts TDX key IDs, how many the TD holds after each INIT_VM and after it is closed.

A departure is one of three verdicts (item 5 of the fuzz issue):
- STRICTER: the kernel refused what the model lets through only because the policy has its
  known hole, or answered as the policy with that hole closed: the invariant allows it, and
  it is reported apart, not as a bug;
- BREAKS_INVARIANT: the answer itself breaks the invariant (a bit never reported ACCEPTED,
  or a bit KVM hides let through to the module);
- DIFFERS: any other departure: the kernel is not the one predicted.
The first departure that is not STRICTER ends the judging of a scenario: what the TD holds
after it is no longer known.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from enum import Enum

from kvmtdx import layout
from kvmtdx.fuzz.scenario import HEADER_WORDS, CapsCall, Scenario
from kvmtdx.model import invariant, lifecycle, mirror
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.lifecycle import TdState
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Outcome
from kvmtdx.status import errno_name
from kvmtdx.structs import REGISTERS, CpuidEntry


@dataclass(frozen=True, slots=True)
class Model:
    """What the answers are predicted by: the module, host and policy of the run, and what
    the kernel reported (the invariant's "reported")."""

    module: ModuleProfile
    host: Host
    policy: Policy
    reported: tuple[CpuidEntry, ...]

    @property
    def closed(self) -> Policy | None:
        return invariant.hole_closed(self.policy)


@dataclass(frozen=True, slots=True)
class CapsAnswer:
    """KVM_TDX_CAPABILITIES as the caller saw it afterwards."""

    errno: int
    buffer: bytes


Answer = Outcome | CapsAnswer


@dataclass(frozen=True, slots=True)
class Observed:
    """What the backend did with a scenario: each call's answer, the key IDs the TD held after
    each call, and after it was closed (None: the backend does not count them)."""

    answers: tuple[Answer, ...]
    held: tuple[int | None, ...]
    held_after_close: int | None


class Call(str, Enum):
    """Which answer departs from the prediction."""

    INIT_VM = "init_vm"
    CAPABILITIES = "capabilities"
    KEY_IDS = "key_ids"


class Verdict(str, Enum):
    STRICTER = "stricter"
    DIFFERS = "differs"
    BREAKS_INVARIANT = "breaks_invariant"

    @property
    def fails(self) -> bool:
        return self is not Verdict.STRICTER


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """One answer that is not the prediction.  `group` is what findings are told apart by:
    the call, the verdict, the mirror's deciding check and who decides, the observed kind and
    errno (a finding is the smallest scenario of its group)."""

    step: int  # the call's position in the scenario (its length: after the TD was closed)
    call: Call
    verdict: Verdict
    expected: str
    actual: str
    group: tuple[str, ...]
    predicted: Outcome | None = None  # an INIT_VM's
    observed: Outcome | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Judgement:
    departures: tuple[Discrepancy, ...]  # STRICTER ones, then at most one that fails
    unjudged: str | None = None  # why judging stopped early (no free key ID)

    @property
    def worst(self) -> Discrepancy | None:
        return self.departures[-1] if self.departures else None


def judge(model: Model, scenario: Scenario, observed: Observed) -> Judgement:
    state = TdState.UNINITIALIZED
    found: list[Discrepancy] = []
    for k, (step, answer) in enumerate(zip(scenario, observed.answers, strict=True)):
        if isinstance(step, CapsCall):
            assert isinstance(answer, CapsAnswer)
            d = _capabilities(model, state, k, step, answer)
        else:
            assert isinstance(answer, Outcome)
            if answer.errno == _errno.ENOSPC:
                # The mirror assumes a free key ID; how many are free is the machine's.
                return Judgement(tuple(found), f"call {k + 1} found no free TDX key ID "
                                                "(ENOSPC): not judged")
            d, state = _init_vm(model, state, k, step, answer)
            d = d or _held(k, state, observed.held[k])
        if d is not None:
            found.append(d)
            if d.verdict.fails:
                return Judgement(tuple(found))
    d = _held(len(scenario), None, observed.held_after_close)
    return Judgement(tuple(found) + ((d,) if d is not None else ()))


# ---------------------------------------------------------------------------
# INIT_VM.


def _init_vm(model: Model, state: TdState, k: int, req: Request, answer: Outcome
             ) -> tuple[Discrepancy | None, TdState]:
    m, h, p = model.module, model.host, model.policy
    pred = lifecycle.predict_in(m, h, p, state, req)
    closed_policy = model.closed
    closed = lifecycle.predict_in(m, h, closed_policy, state, req) \
        if closed_policy is not None else None
    agree = invariant.against_prediction(model.reported, req, pred, answer, module=m, host=h,
                                         closed=closed)
    if agree is invariant.Agreement.SAME:
        return None, lifecycle.after(p, state, pred)
    if agree is invariant.Agreement.STRICTER:
        as_closed = closed is not None and answer.same_answer(closed)
        basis = closed if as_closed and closed is not None else answer
        note = invariant.HOLE_CLOSED_NOTE if as_closed else invariant.STRICTER_NOTE
        return _outcome_departure(k, Verdict.STRICTER, pred, answer, note), \
            lifecycle.after(p, state, basis)
    breaks = invariant.is_known_hole(model.reported, req, answer, module=m, host=h)
    verdict = Verdict.BREAKS_INVARIANT if breaks else Verdict.DIFFERS
    note = _broken(model, req, answer) if breaks else ""
    return _outcome_departure(k, verdict, pred, answer, note), state


def _outcome_departure(k: int, verdict: Verdict, pred: Outcome, answer: Outcome,
                       note: str) -> Discrepancy:
    group = (Call.INIT_VM.value, verdict.value, pred.check or "",
             pred.decider.value if pred.decider is not None else "",
             answer.kind.value, answer.errno_name or "0")
    return Discrepancy(k, Call.INIT_VM, verdict, pred.describe(), answer.describe(), group,
                       predicted=pred, observed=answer, note=note)


def _ref(model: Model, key: invariant.BitKey) -> str:
    leaf, index, register, bit = key
    sub = next((r.subleaf for r in model.module.rows if (r.leaf, r.kvm_index) == (leaf, index)),
               index)
    return BitRef(leaf, sub, register, bit).label()


def _broken(model: Model, req: Request, answer: Outcome) -> str:
    """Which bits break the invariant in this answer, by name."""
    m, h = model.module, model.host
    j = invariant.judge(model.reported, req, answer, module=m, host=h)
    if not j.kept:
        return (", ".join(_ref(model, b) for b in j.outside)
                + f" never reported, yet {answer.kind.value}")
    hidden = invariant.hidden_landed(model.reported, req, m, h)
    return (", ".join(_ref(model, b) for b in hidden) + " hidden by KVM, yet let through to "
            f"the TDX module ({answer.kind.value}): KVM must refuse them")


# ---------------------------------------------------------------------------
# Key IDs.


def _held(k: int, state: TdState | None, held: int | None) -> Discrepancy | None:
    """The TD holds a key ID exactly while initialised (`state` None: closed, it holds none)."""
    if held is None:
        return None
    want = 1 if state is TdState.INITIALIZED else 0
    if held == want:
        return None
    when = "once the TD was closed" if state is None else f"after call {k + 1}"
    return Discrepancy(k, Call.KEY_IDS, Verdict.DIFFERS, f"{want} key IDs held {when}",
                       f"{held} key IDs held {when}",
                       (Call.KEY_IDS.value, "closed" if state is None else "open", str(want),
                        str(held)),
                       note="a TD holds a TDX key ID from a successful INIT_VM until it is "
                            "closed, and none after a refusal")


# ---------------------------------------------------------------------------
# KVM_TDX_CAPABILITIES.


def _capabilities(model: Model, state: TdState, k: int, call: CapsCall,
                  answer: CapsAnswer) -> Discrepancy | None:
    buf = call.buffer()
    if state is TdState.DEAD:
        want_errno, want = lifecycle.caps_errno_in(state), buf
    else:
        pred = mirror.predict_capabilities(model.module, model.host, model.policy, call.nent,
                                           flags=call.flags, hw_error=call.hw_error, caller=buf)
        want_errno = pred.errno
        want = buf if pred.buffer is None else pred.buffer
    if answer.errno == want_errno and answer.buffer == want:
        return None
    where = "" if answer.buffer == want else difference(want, answer.buffer)
    expected = f"KVM_TDX_CAPABILITIES {_errno_text(want_errno)}"
    actual = f"KVM_TDX_CAPABILITIES {_errno_text(answer.errno)}"
    if where:
        actual += f", the buffer differs at {where}"
        expected += ", the buffer " + ("untouched" if want == buf else "as predicted")
    group = (Call.CAPABILITIES.value, Verdict.DIFFERS.value, _errno_text(want_errno),
             _errno_text(answer.errno), where.split("[")[0].split(" ")[0])
    return Discrepancy(k, Call.CAPABILITIES, Verdict.DIFFERS, expected, actual, group)


def _errno_text(err: int) -> str:
    return "success" if not err else f"-{errno_name(err)}"


def difference(want: bytes, got: bytes) -> str:
    """Where two capabilities buffers first differ, by field: a header word, reserved[i],
    nent, the padding, or an entry's field."""
    if len(want) != len(got):
        return f"its length ({len(got)} bytes, not {len(want)})"
    head = layout.SIZEOF_CAPS_HEADER
    a = layout.unpack_capabilities(want[:head])
    b = layout.unpack_capabilities(got[:head])
    for name in (*HEADER_WORDS, "nent", "cpuid_padding"):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            return f"{name} (0x{vb:x}, not 0x{va:x})"
    for i, (va, vb) in enumerate(zip(a.reserved, b.reserved, strict=True)):
        if va != vb:
            return f"reserved[{i}] (0x{vb:x}, not 0x{va:x})"
    size = layout.SIZEOF_CPUID_ENTRY2
    for i in range((len(want) - head) // size):
        ea = layout.unpack_entry(want[head + i * size:])
        eb = layout.unpack_entry(got[head + i * size:])
        if ea != eb:
            return f"entries[{i}] {_entry_field(ea, eb)}"
    return "no field (identical)"


def _entry_field(a: CpuidEntry, b: CpuidEntry) -> str:
    for name in ("function", "index", "flags", *REGISTERS):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            return f"{name} (0x{vb:x}, not 0x{va:x}; entry 0x{b.function:x}.{b.index})"
    return "padding"

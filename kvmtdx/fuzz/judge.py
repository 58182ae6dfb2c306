"""Holding what a backend answered to a scenario against the mirror, as spec section 5 judges.

Pure code.  Each call's answer is compared with the exact prediction for the TD's state at
that point (kvmtdx.model.lifecycle): an INIT_VM by outcome kind, errno and hw_error, then
the kernel WARNs it provoked where the backend counts them (kvmtdx.fuzz.judge_init_vm); a
KVM_TDX_CAPABILITIES by errno and the caller's whole buffer afterwards; the vCPU path by
each ioctl's errno, what KVM_TDX_GET_CPUID wrote where, and the TD's CPUID it gave
(kvmtdx.fuzz.judge_vcpu); and, where the backend counts TDX key IDs, how many the TD holds
after each call and after it is closed.

A departure is one of three verdicts (item 5 of the fuzz issue):
- STRICTER: the kernel refused what the model lets through only because the policy has its
  known hole, or answered as the policy with a known bug fixed (the bypass closed, the WARN
  replaced by MODULE_REJECTED, KVM_SET_CPUID2 held to the TD's CPUID): the invariant allows
  it, and it is reported apart, not as a bug;
- BREAKS_INVARIANT: the answer itself breaks the invariant (a bit never reported ACCEPTED,
  or a bit KVM hides let through to the module);
- DIFFERS: any other departure: the kernel is not the one predicted.
The first departure that is not STRICTER ends the judging of a scenario: what the TD holds
after it is no longer known.
"""

from __future__ import annotations

import errno as _errno

from kvmtdx import layout
from kvmtdx.fuzz.judge_init_vm import init_vm_step
from kvmtdx.fuzz.judge_vcpu import Initialised, vcpu_step
from kvmtdx.fuzz.judgement import (
    Answer,
    Call,
    CapsAnswer,
    Discrepancy,
    Judgement,
    Model,
    Observed,
    Unjudged,
    VcpuAnswer,
    Verdict,
    errno_text,
)
from kvmtdx.fuzz.scenario import HEADER_WORDS, CapsCall, Scenario, VcpuCall
from kvmtdx.model import lifecycle, mirror
from kvmtdx.model.lifecycle import TdState
from kvmtdx.model.policy import Policy
from kvmtdx.outcome import Outcome
from kvmtdx.structs import REGISTERS, CpuidEntry

__all__ = ["Answer", "Call", "CapsAnswer", "Discrepancy", "Judgement", "Model", "Observed",
           "VcpuAnswer", "Verdict", "difference", "judge"]


def judge(model: Model, scenario: Scenario, observed: Observed) -> Judgement:
    found: list[Discrepancy] = []
    refused: list[str] = []
    try:
        _judge(model, scenario, observed, found, refused)
    except Unjudged as e:
        return Judgement(tuple(found), str(e), next(iter(refused), None))
    return Judgement(tuple(found), None, next(iter(refused), None))


def _judge(model: Model, scenario: Scenario, observed: Observed,
           found: list[Discrepancy], refused: list[str]) -> None:
    """Each call in turn into `found`, until one departs in a way that fails; `refused`
    gets the vCPU ioctl a backend without them answered ENOTTY."""
    state = TdState.UNINITIALIZED
    origin: Initialised | None = None
    for k, (step, answer) in enumerate(zip(scenario, observed.answers, strict=True)):
        if isinstance(step, CapsCall):
            assert isinstance(answer, CapsAnswer)
            d = _capabilities(model, state, k, step, answer)
        elif isinstance(step, VcpuCall):
            assert isinstance(answer, VcpuAnswer)
            d, lacks = vcpu_step(model, state, origin, k, step, answer)
            refused += [lacks] if lacks is not None else []
            d = d or _held(k, state, observed.held[k])
        else:
            assert isinstance(answer, Outcome)
            if answer.errno == _errno.ENOSPC:
                # The mirror assumes a free key ID; how many are free is the machine's.
                raise Unjudged(f"call {k + 1} found no free TDX key ID (ENOSPC)")
            before = state
            d, state = init_vm_step(model, state, k, step, answer, observed)
            if before is not state and state is TdState.INITIALIZED:
                origin = Initialised(step, _policy_of(model, d))
            d = d or _held(k, state, observed.held[k])
        if d is not None:
            found.append(d)
            if d.verdict.fails:
                return
    d = _held(len(scenario), None, observed.held_after_close)
    if d is not None:
        found.append(d)


def _policy_of(model: Model, d: Discrepancy | None) -> Policy:
    """The policy whose prediction an accepted INIT_VM was: the run's, unless the kernel was
    stricter than it by answering as the policy with its hole closed."""
    if d is not None and d.call is Call.INIT_VM and model.closed is not None:
        return model.closed
    return model.policy


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
    expected = f"KVM_TDX_CAPABILITIES {errno_text(want_errno)}"
    actual = f"KVM_TDX_CAPABILITIES {errno_text(answer.errno)}"
    if where:
        actual += f", the buffer differs at {where}"
        expected += ", the buffer " + ("untouched" if want == buf else "as predicted")
    group = (Call.CAPABILITIES.value, Verdict.DIFFERS.value, errno_text(want_errno),
             errno_text(answer.errno), where.split("[")[0].split(" ")[0])
    return Discrepancy(k, Call.CAPABILITIES, Verdict.DIFFERS, expected, actual, group)


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

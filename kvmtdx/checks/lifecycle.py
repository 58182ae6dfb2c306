"""lifecycle: what a KVM_TDX_INIT_VM leaves behind on its TD (kvmtdx.model.lifecycle).

Linux 7.3 initialises a TD only when INIT_VM succeeds: a refusal by KVM comes before any key
ID is taken, and a refusal by the TDX module tears down what was built (the key ID back in
the pool at once), so the same TD takes a corrected INIT_VM; after success it takes no
other.  KVM_TDX_CAPABILITIES answers the same on a TD whatever happened to it.  Each check
sends its calls to one TD, in order, and holds each answer to the mirror's prediction for
that sequence (or, without a profile, to the kind every kernel gives).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvmtdx.checks.context import Context
from kvmtdx.checks.init_vm_structure import module_refused_bit
from kvmtdx.checks.registry import Verdict, bad, check, describe, ok, skip
from kvmtdx.device import TdxVm
from kvmtdx.knowledge import caps_equal
from kvmtdx.model import builders
from kvmtdx.model.builders import strays
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import lowest_bit
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.status import errno_name
from kvmtdx.verdict import Status

GROUP = "lifecycle"
_WORD_64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True, slots=True)
class Step:
    label: str
    request: Request
    kind: Kind  # what every kernel answers at this point of the sequence


def _run(ctx: Context, td: TdxVm, steps: Sequence[Step]) -> list[Outcome]:
    return [ctx.send(td, s.request) for s in steps]


def _judge(ctx: Context, steps: Sequence[Step], got: Sequence[Outcome], *,
           exact: bool = True) -> Verdict:
    """Each answer against the mirror's sequence (when `exact` and the run can predict),
    else against the step's kind."""
    pred = ctx.predict_sequence([s.request for s in steps]) if exact else None
    for k, (s, o) in enumerate(zip(steps, got, strict=True)):
        if pred is not None:
            want = pred.outcomes[k]
            if not o.same_answer(want):
                return bad(f"call {k + 1} ({s.label}): {describe(o)}, expected "
                           f"{describe(want)}", f"{s.label}: {want.describe()}",
                           f"{s.label}: {describe(o)}")
        elif o.kind != s.kind:
            return bad(f"call {k + 1} ({s.label}): {describe(o)}, expected {s.kind.value}",
                       f"{s.label}: {s.kind.value}", f"{s.label}: {describe(o)}")
    return ok("; ".join(f"{s.label}: {describe(o)}" for s, o in zip(steps, got, strict=True)))


def _kvm_refusals(ctx: Context) -> list[Step]:
    """A request refused at each of KVM's own steps, before any key ID is taken."""
    bit = lowest_bit(~ctx.caps.supported_attrs & _WORD_64)
    return [
        Step("reserved[0] set", ctx.base(reserved=(1,) + (0,) * 11), Kind.KVM_REJECTED),
        Step("nent 257", ctx.base(nent=257), Kind.ERROR),
        Step(f"attribute bit {bit}", ctx.base(attributes=1 << bit), Kind.KVM_REJECTED),
        Step("no GPAW entry", ctx.base(gpaw=None), Kind.KVM_REJECTED),
        Step("a stray entry", ctx.base(strays(1)), Kind.KVM_REJECTED),
    ]


def _valid_then_again(ctx: Context) -> list[Step]:
    return [Step("minimal request", ctx.base(), Kind.ACCEPTED),
            Step("the same again", ctx.base(), Kind.KVM_REJECTED)]


def _module_refusal(ctx: Context) -> tuple[Step, bool]:
    """A request KVM passes and the TDX module refuses, and whether the mirror can predict
    it: a bit the module's profile says it never takes, else (no profile) a leaf 1 F/M/S
    one stepping off the host's, which every module refuses for a TD that is not
    migratable (predictable only when the host is known, not inferred)."""
    found = module_refused_bit(ctx)
    if found is not None:
        e, ref = found
        return Step(f"{ref.label()} (the module never takes it)", ctx.base((e,)),
                    Kind.MODULE_REJECTED), True
    return Step("F/M/S one stepping off", ctx.base((builders.fms_entry(ctx.native_fms()),)),
                Kind.MODULE_REJECTED), ctx.know.host_exact


@check("lifecycle_reinit_after_kvm_refusal", GROUP,
       "one TD: INIT_VM refused at each of KVM's steps (reserved, nent, attributes, GPAW, "
       "count), then a valid one ACCEPTED, then another refused (EINVAL)")
def lifecycle_reinit_after_kvm_refusal(ctx: Context) -> Verdict:
    steps = _kvm_refusals(ctx) + _valid_then_again(ctx)
    with ctx.td() as td:
        got = _run(ctx, td, steps)
    return _judge(ctx, steps, got)


@check("lifecycle_reinit_after_module_refusal", GROUP,
       "one TD: INIT_VM refused twice by the TDX module (a bit it never takes, or a wrong "
       "F/M/S) gives its key ID back each time, then a valid one is ACCEPTED, then another "
       "refused; closing the TD gives back the key ID (where the backend counts them)")
def lifecycle_reinit_after_module_refusal(ctx: Context) -> Verdict:
    refused, exact = _module_refusal(ctx)
    steps = [refused, refused, *_valid_then_again(ctx)]
    before = ctx.free_key_ids()
    held: list[int | None] = []
    with ctx.td() as td:
        got = []
        for s in steps:
            got.append(ctx.send(td, s.request))
            held.append(None if before is None else before - (ctx.free_key_ids() or 0))
    v = _judge(ctx, steps, got, exact=exact)
    if v.status is not Status.PASS:
        return v
    if before is None:
        return ok(f"{v.detail} (key IDs not checked: this backend does not count them)")
    # One key ID held from the first success on; none after a refusal.
    want = [1 if any(g.kind == Kind.ACCEPTED for g in got[:i + 1]) else 0
            for i in range(len(got))]
    if held != want:
        k = next(i for i, (h, w) in enumerate(zip(held, want, strict=True)) if h != w)
        return bad(f"after call {k + 1} ({steps[k].label}) the TD holds {held[k]} key IDs, "
                   f"expected {want[k]}: a refused INIT_VM must give its key ID back at once",
                   f"{want[k]} key IDs held", f"{held[k]} key IDs held")
    left = before - (ctx.free_key_ids() or 0)
    if left:
        return bad(f"closing the TD left {left} key IDs taken", "0 key IDs held",
                   f"{left} key IDs held")
    return ok(f"{v.detail}; key IDs held after each call: {held}, after close: 0")


@check("lifecycle_caps_after_init_vm", GROUP,
       "KVM_TDX_CAPABILITIES on one TD before INIT_VM, after a refusal by KVM, after one by "
       "the module and after success answers the same as on a fresh TD")
def lifecycle_caps_after_init_vm(ctx: Context) -> Verdict:
    moments = [("before INIT_VM", None),
               ("after a KVM refusal", _kvm_refusals(ctx)[2].request),
               ("after a module refusal", _module_refusal(ctx)[0].request),
               ("once initialised", ctx.base())]
    answers = []
    with ctx.td() as td:
        for label, req in moments:
            init = "" if req is None else f" (INIT_VM {describe(ctx.send(td, req))})"
            try:
                caps = td.capabilities()
            except OSError as e:
                return bad(f"{label}{init}: KVM_TDX_CAPABILITIES failed: "
                           f"{errno_name(e.errno or errno.EIO)}", "the fresh TD's answer",
                           errno_name(e.errno or errno.EIO))
            if not caps_equal(caps, ctx.caps, entry_flags=False):
                return bad(f"{label}{init}: KVM_TDX_CAPABILITIES answers otherwise than on a "
                           "fresh TD", "the fresh TD's answer", "a different answer")
            answers.append(f"{label}{init}")
    return ok("the same capabilities " + ", ".join(answers))


@check("lifecycle_second_init_refused_first", GROUP,
       "on an initialised TD, INIT_VM is refused (EINVAL) before anything else is looked at: "
       "nent 257, a request the module would refuse, an unsupported attribute, flags set")
def lifecycle_second_init_refused_first(ctx: Context) -> Verdict:
    first = Step("minimal request", ctx.base(), Kind.ACCEPTED)
    bit = lowest_bit(~ctx.caps.supported_attrs & _WORD_64)
    after = [Step("nent 257", ctx.base(nent=257), Kind.KVM_REJECTED),
             replace(_module_refusal(ctx)[0], kind=Kind.KVM_REJECTED),
             Step(f"attribute bit {bit}", ctx.base(attributes=1 << bit), Kind.KVM_REJECTED),
             Step("flags 1", ctx.base(flags=1), Kind.KVM_REJECTED)]
    with ctx.td() as td:
        got = [ctx.send(td, first.request)]
        if got[0].kind != Kind.ACCEPTED:
            return skip(f"the first INIT_VM was not accepted ({describe(got[0])}); "
                        "init_vm_minimal_accepted reports it")
        got += _run(ctx, td, after)
    return _judge(ctx, [first, *after], got)

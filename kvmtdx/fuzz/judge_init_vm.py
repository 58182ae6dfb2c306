"""One KVM_TDX_INIT_VM answer against the prediction for the TD's state: the outcome (kind,
errno, hw_error), then, where the backend says, the kernel WARNs the call provoked.

Pure code.  The outcome is judged by the invariant (kvmtdx.model.invariant): the answers of
the policy with a known bug fixed (the denylist bypass closed; the WARN on a module status
that is not an operand's replaced by MODULE_REJECTED with the status) are STRICTER, not
differences.
"""

from __future__ import annotations

from kvmtdx.fuzz.judgement import Call, Discrepancy, Model, Observed, Unjudged, Verdict
from kvmtdx.model import invariant, lifecycle
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.lifecycle import TdState
from kvmtdx.model.mirror import InitVmPrediction
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Outcome

# Predictions that rest on what an inferred host cannot know (verify skips GPAW 52 there).
INFERRED_HOST_CANNOT_TELL = frozenset({"gpaw_5level"})
NO_WARN_NOTE = ("Linux 7.3 WARNs here (a userspace-reachable WARN is a kernel bug: spec "
                "section 4 step 10); this kernel gives the same answer without one")


def init_vm_step(model: Model, state: TdState, k: int, req: Request, answer: Outcome,
                 observed: Observed) -> tuple[Discrepancy | None, TdState]:
    """Call `k` of a scenario judged, and the TD's state after it."""
    m, h, p = model.module, model.host, model.policy
    pred = lifecycle.prediction_in(m, h, p, state, req, detail=False)
    if answer.same_answer(pred.outcome):
        d = _warned(k, pred, observed.warned_at(k))
        return d, lifecycle.after(p, state, pred.outcome)
    if not model.host_exact and pred.outcome.check in INFERRED_HOST_CANNOT_TELL:
        raise Unjudged(f"call {k + 1}: {pred.outcome.check} depends on what a host inferred "
                       "from the capabilities cannot tell (give --host)")
    fixed = _fixed(model, state, req, pred)
    agree = invariant.against_prediction(model.reported, req, pred.outcome, answer, module=m,
                                         host=h, fixed=[o for o, _ in fixed])
    if agree is invariant.Agreement.DIFFERS:
        breaks = invariant.is_known_hole(model.reported, req, answer, module=m, host=h)
        verdict = Verdict.BREAKS_INVARIANT if breaks else Verdict.DIFFERS
        note = _broken(model, req, answer) if breaks else ""
        return _departure(k, verdict, pred.outcome, answer, note), state
    basis, note = next(((o, n) for o, n in fixed if answer.same_answer(o)),
                       (answer, invariant.STRICTER_NOTE))
    return _departure(k, Verdict.STRICTER, pred.outcome, answer, note), \
        lifecycle.after(p, state, basis)


def _fixed(model: Model, state: TdState, req: Request, pred: InitVmPrediction
           ) -> list[tuple[Outcome, str]]:
    """The answers of the policy with a known bug fixed, each with the note that says so."""
    out = []
    closed = model.closed
    if closed is not None:
        o = lifecycle.prediction_in(model.module, model.host, closed, state, req,
                                    detail=False).outcome
        out.append((o, invariant.HOLE_CLOSED_NOTE))
    warn = invariant.warn_fixed(pred)
    if warn is not None:
        out.append((warn, invariant.WARN_FIXED_NOTE))
    return out


def _departure(k: int, verdict: Verdict, pred: Outcome, answer: Outcome,
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


def _warned(k: int, pred: InitVmPrediction, warned: int | None) -> Discrepancy | None:
    """The kernel WARNs exactly where the model says Linux 7.3 does (where it is counted)."""
    if warned is None or bool(warned) == pred.warns:
        return None
    said = "a kernel WARN" if pred.warns else "no kernel WARN"
    got = f"{warned} kernel WARN splat(s)" if warned else "no kernel WARN"
    verdict = Verdict.STRICTER if pred.warns else Verdict.DIFFERS
    note = NO_WARN_NOTE if pred.warns else "a WARN a request provokes is a kernel bug"
    return Discrepancy(k, Call.KERNEL_WARN, verdict, f"{pred.outcome.describe()} with {said}",
                       f"{pred.outcome.kind.value} with {got}",
                       (Call.KERNEL_WARN.value, verdict.value, pred.outcome.check or ""),
                       predicted=pred.outcome, note=note)

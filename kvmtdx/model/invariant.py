"""Spec section 5's invariant, in one place: a bit outside what KVM_TDX_CAPABILITIES reported
is never ACCEPTED.

The conformance checks and the prober judge a kernel's answer with it whether or not
anything else is known of the kernel: it needs only what the kernel reported, the request
and the outcome.  A module profile and a host, when known, add the one exemption the
contract has (spec section 4, "silently cleared"): an allow_direct bit the host lacks
natively is reported by no policy, yet TDH.MNG.INIT drops it instead of refusing, so a
request carrying it is ACCEPTED by a correct kernel.

A request's bits are judged where KVM's lookup puts them: for each row KVM reported, the
entry find() hands that row (the first of the function without the significant-index flag
or with the row's index, among the first nent entries) carries the bits that reach the
TD's row, and those outside the reported row are outside.  So an entry steered onto a row
by the lookup trap is judged against the row it lands on, and a legal entry whose index
the lookup ignores is judged against its row, not refused for its index.  Entries that
land on no row reach no TD.  Value registers hold fields, not features, and are not judged.

The invariant also decides where an exact prediction may be departed from
(`against_prediction`): the mirror reproduces a policy's known hole (upstream ACCEPTS
the lookup bypass), and a kernel that closes it must pass, not fail for being stricter
than the model.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from kvmtdx.model.mirror import InitVmPrediction, find, silently_cleared
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile, enumerated
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import bits_of, is_value_register
from kvmtdx.outcome import Decider, Kind, Outcome
from kvmtdx.structs import REGISTERS, CpuidEntry, InitVm

BitKey = tuple[int, int, str, int]  # leaf, KVM index, register, bit (as the prober keys bits)


def outside_reported(reported: Sequence[CpuidEntry],
                     entries: Sequence[CpuidEntry]) -> tuple[BitKey, ...]:
    """The feature bits `entries` put on the reported rows beyond what each row reported,
    keyed by the row they land on (KVM's lookup), in row order."""
    out: list[BitKey] = []
    for row in reported:
        e = find(entries, row.function, row.index)
        if e is None:
            continue
        for r in REGISTERS:
            if is_value_register(row.function, row.index, r):
                continue
            extra = e.reg(r) & ~row.reg(r)
            out.extend((row.function, row.index, r, b) for b in bits_of(extra))
    return tuple(out)


def _cleared(module: ModuleProfile, host: Host, key: BitKey) -> bool:
    leaf, index, register, bit = key
    for i, row in enumerate(module.rows):
        if row.leaf == leaf and row.kvm_index == index:
            return bool(silently_cleared(module, host, i, register) >> bit & 1)
    return False


@dataclass(frozen=True, slots=True)
class InvariantJudgement:
    """One answer held to the invariant.

    `outside`: the request's bits outside what was reported that the module does not
    drop; `exempt`: those it drops silently (the host lacks them).  `kept` is False
    exactly when the answer was ACCEPTED and `outside` is not empty.
    """

    kept: bool
    outside: tuple[BitKey, ...]
    exempt: tuple[BitKey, ...]


def judge(reported: Sequence[CpuidEntry], request: Request | InitVm, outcome: Outcome, *,
          module: ModuleProfile | None = None, host: Host | None = None) -> InvariantJudgement:
    """Whether one INIT_VM answer keeps "a bit outside what was reported is never ACCEPTED".

    `reported` is what KVM_TDX_CAPABILITIES listed; `module` and `host` (both, or the
    exemption is not applied) say which of the request's unreported bits the module drops
    silently.  The invariant's other half (every reported bit together is ACCEPTED) needs a
    request valid beyond its bits, which only its builder knows: see `outside_reported`.
    """
    iv = request.init_vm if isinstance(request, Request) else request
    outside: list[BitKey] = []
    exempt: list[BitKey] = []
    # KVM reads nent entries: any beyond them never reach the TD.
    for key in outside_reported(reported, iv.entries[:iv.effective_nent]):
        if module is not None and host is not None and _cleared(module, host, key):
            exempt.append(key)
        else:
            outside.append(key)
    kept = not (outcome.kind is Kind.ACCEPTED and outside)
    return InvariantJudgement(kept, tuple(outside), tuple(exempt))


class Agreement(str, Enum):
    """How an observed answer stands to the exact prediction, as spec section 5 judges it."""

    SAME = "same"  # the answer is the prediction
    # The prediction breaks the invariant (the policy's known hole: bits never reported
    # ACCEPTED) and the kernel refused them itself, or the kernel answers as the policy
    # with a known bug fixed (`hole_closed`, `warn_fixed`): stricter than the model, and
    # right.
    STRICTER = "stricter"
    DIFFERS = "differs"  # any other difference: the kernel is not the one predicted


STRICTER_NOTE = ("the model predicts the policy's known hole (bits never reported reach the "
                 "TD); this kernel refused them itself: stricter than the model, keeping the "
                 "invariant")


HOLE_CLOSED_NOTE = ("this kernel answers as the policy with its known hole closed (the "
                    "denylist judging the row KVM's lookup lands an entry on, not the entry's "
                    "own index): a fix of the bypass, keeping the invariant")


def hole_closed(policy: Policy) -> Policy | None:
    """`policy` with its known hole closed: the denylist judging the row KVM's lookup lands
    an entry on rather than the entry's own index, as a kernel that fixes the bypass does.
    None when the policy has no such hole (no denylist, or one that judges rows already).

    Such a kernel departs from the exact prediction both ways: it refuses the bypass, and it
    no longer refuses a denied bit that an entry of index 0 carries onto another row (the
    module judges it there).  Both answers keep the invariant."""
    deny = policy.denylist
    if deny is None or deny.judges_row:
        return None
    return replace(policy, denylist=replace(deny, judges_row=True))


WARN_FIXED_NOTE = ("the model predicts Linux 7.3's answer to a TDX module status that is not "
                   "the caller's operand: -EIO, hw_error not written, a kernel WARN and a "
                   "bugged VM (spec section 4 step 10: a userspace-reachable WARN is a kernel "
                   "bug); this kernel refuses the request as MODULE_REJECTED with the status "
                   "in hw_error, as the invariant wants")


def warn_fixed(prediction: InitVmPrediction) -> Outcome | None:
    """Where the prediction is Linux 7.3's WARN (a module status that is not an operand's:
    -EIO), the answer of a kernel that fixes it by handing every status to userspace:
    -EINVAL with the status in hw_error, the VM left alive.  None elsewhere."""
    o = prediction.outcome
    if not prediction.warns or not prediction.status:
        return None
    return Outcome.classify(errno.EINVAL, prediction.status, check=o.check,
                            decider=Decider.MODULE, leaf=o.leaf, subleaf=o.subleaf,
                            register=o.register, bit=o.bit)


SET_CPUID2_VALIDATED_NOTE = ("Linux 7.3 takes any CPUID in KVM_SET_CPUID2 on a TD vCPU "
                             "(kvm_set_cpuid has no TD path: the series leaves it open); this "
                             "kernel refuses one unlike the TD's (KVM_TDX_GET_CPUID), holding "
                             "KVM's own view of the guest to what the TD has")


def set_cpuid2_validated(td: Sequence[CpuidEntry], told: Sequence[CpuidEntry]) -> int | None:
    """Where a TD vCPU's KVM_SET_CPUID2 is handed a CPUID unlike the TD's (as
    KVM_TDX_GET_CPUID gave it), the answer of a kernel that closes the series' open question
    by holding it to the TD's: -EINVAL.  None where it is the TD's own."""
    return None if tuple(told) == tuple(td) else errno.EINVAL


def against_prediction(reported: Sequence[CpuidEntry], request: Request | InitVm,
                       predicted: Outcome, actual: Outcome, *,
                       module: ModuleProfile | None = None, host: Host | None = None,
                       fixed: Sequence[Outcome] = ()) -> Agreement:
    """Predictions stay exact; verdicts follow the invariant.  Where the prediction itself
    breaks the invariant (is_known_hole, judged against what this kernel reported), the
    answer the invariant asks for is KVM's own refusal (spec section 5: a bit KVM hides but
    the module would take comes back KVM_REJECTED), and that answer passes.  `fixed` are the
    answers of the policy with a known bug fixed (`hole_closed`'s prediction, `warn_fixed`,
    where they apply): those pass too.  Every other departure from the prediction, a refusal
    of a request the invariant lets through included, is a difference."""
    if actual.same_answer(predicted):
        return Agreement.SAME
    if actual.kind is Kind.KVM_REJECTED and \
            is_known_hole(reported, request, predicted, module=module, host=host):
        return Agreement.STRICTER
    if any(actual.same_answer(f) for f in fixed):
        return Agreement.STRICTER
    return Agreement.DIFFERS


def hidden_landed(reported: Sequence[CpuidEntry], request: Request | InitVm,
                  module: ModuleProfile, host: Host) -> tuple[BitKey, ...]:
    """Bits the module would take that KVM did not report, as KVM's lookup (find) hands the
    request's entries to the module's rows: what spec section 5 says KVM must refuse."""
    iv = request.init_vm if isinstance(request, Request) else request
    entries = iv.entries[:iv.effective_nent]
    have = {(e.function, e.index): e for e in reported}
    out: list[BitKey] = []
    for i, (row, listed) in enumerate(zip(module.rows, enumerated(module, host), strict=True)):
        e = find(entries, row.leaf, row.kvm_index)
        if e is None:
            continue
        shown = have.get((row.leaf, row.kvm_index))
        for r, take, unknown in zip(REGISTERS, listed, module.unknown_mask(i), strict=True):
            if is_value_register(row.leaf, row.kvm_index, r):
                continue
            hid = e.reg(r) & take & ~unknown & ~(shown.reg(r) if shown is not None else 0)
            out.extend((row.leaf, row.kvm_index, r, b) for b in bits_of(hid))
    return tuple(out)


def is_known_hole(reported: Sequence[CpuidEntry], request: Request | InitVm, predicted: Outcome,
                  *, module: ModuleProfile | None = None, host: Host | None = None) -> bool:
    """Whether a prediction breaks the invariant: bits never reported ACCEPTED, or (module
    and host known) bits KVM hides but the module would take let through to the module."""
    if not judge(reported, request, predicted, module=module, host=host).kept:
        return True
    past_kvm = predicted.kind in (Kind.ACCEPTED, Kind.MODULE_REJECTED) or \
        predicted.decider is Decider.MODULE
    return past_kvm and module is not None and host is not None and \
        bool(hidden_landed(reported, request, module, host))

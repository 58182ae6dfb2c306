"""The check registry and the helpers checks judge with.

A check is a function of the run context that returns a Verdict; `@check` registers it
under a stable id and its group.  Ids are ASCII and underscored: reports, CI dashboards
and kselftest logs key on them, and KTAP numbers them in registry order (group by group
in GROUPS order, and within a group in the order its module defines them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvmtdx.checks.context import Context
from kvmtdx.errors import DataError
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.invariant import STRICTER_NOTE, Agreement
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.verdict import Status

GROUPS: tuple[str, ...] = (
    "availability", "capabilities", "init_vm_structure", "init_vm_content", "policy",
    "adversarial", "lifecycle", "effective", "hygiene",
)
NEEDS_POLICY = "needs the kernel policy (give --policy)"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A check's verdict before the runner stamps its id and group on it."""

    status: Status
    detail: str
    expected: str = ""
    actual: str = ""
    bits: tuple[BitRef, ...] = ()
    # A failing INIT_VM check's request, as `kvmtdx init-vm --request` replays it, with a
    # note where one fresh TD does not replay it (a second call on one TD).
    request: Request | None = None
    request_note: str = ""


def ok(detail: str, expected: str = "", actual: str = "",
       bits: tuple[BitRef, ...] = ()) -> Verdict:
    return Verdict(Status.PASS, detail, expected, actual, bits)


def bad(detail: str, expected: str = "", actual: str = "",
        bits: tuple[BitRef, ...] = (), *, request: Request | None = None,
        request_note: str = "") -> Verdict:
    return Verdict(Status.FAIL, detail, expected, actual, bits, request, request_note)


def skip(reason: str) -> Verdict:
    return Verdict(Status.SKIP, reason)


def info(detail: str, expected: str = "", actual: str = "",
         bits: tuple[BitRef, ...] = ()) -> Verdict:
    """Ran, and recorded what the kernel did where no rule says what it must do."""
    return Verdict(Status.INFO, detail, expected, actual, bits)


class Skip(Exception):
    """Raised inside a check that lacks what it needs; the runner reports it as a skip."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_T = TypeVar("_T")


def need(value: _T | None, reason: str) -> _T:
    """`value`, or a skip for `reason` when the run does not know it."""
    if value is None:
        raise Skip(reason)
    return value


CheckFn = Callable[[Context], Verdict]


@dataclass(frozen=True, slots=True)
class CheckSpec:
    id: str
    group: str
    about: str
    fn: CheckFn
    after_close: bool = False  # runs once the KVM handle and every TD are closed
    needs: tuple[str, ...] = ()  # checks whose work this one judges: run with it


_REGISTERED: list[CheckSpec] = []
SECOND_CALL = ("sent twice on one TD, the first ACCEPTED; the second answer is the one judged "
               "(kvmtdx init-vm sends it once, on a fresh TD)")


def check(id_: str, group: str, about: str, *, after_close: bool = False,
          needs: tuple[str, ...] = ()) -> Callable[[CheckFn], CheckFn]:
    if group not in GROUPS or not re.fullmatch(r"[a-z0-9_]+", id_):
        raise ValueError(f"check {id_!r}: bad id or unknown group {group!r}")
    if any(s.id == id_ for s in _REGISTERED):
        raise ValueError(f"check {id_!r} registered twice")

    def register(fn: CheckFn) -> CheckFn:
        _REGISTERED.append(CheckSpec(id_, group, about, fn, after_close, needs))
        return fn
    return register


def registered() -> tuple[CheckSpec, ...]:
    """Every registered check, group by group in GROUPS order (stable within a group)."""
    return tuple(sorted(_REGISTERED, key=lambda s: GROUPS.index(s.group)))


def select(ids: Sequence[str] = (), groups: Sequence[str] = ()) -> tuple[CheckSpec, ...]:
    """The checks `--check ID` and `--group NAME` name (every check when neither is given),
    with the checks each needs, in registry order; DataError names what is unknown."""
    every = registered()
    known = {s.id: s for s in every}
    for cid in ids:
        if cid not in known:
            raise DataError(f"--check {cid!r}: no such check (kvmtdx verify --list-checks "
                            f"lists them: {', '.join(known)})")
    for g in groups:
        if g not in GROUPS:
            raise DataError(f"--group {g!r}: no such group ({', '.join(GROUPS)})")
    if not ids and not groups:
        return every
    wanted = {s.id for s in every if s.id in ids or s.group in groups}
    for s in every:
        if s.id in wanted:
            wanted.update(s.needs)
    return tuple(s for s in every if s.id in wanted)


# ---------------------------------------------------------------------------
# Naming and judging.


def describe(o: Outcome) -> str:
    """An outcome without the mirror's reason (that goes in `expected`)."""
    return Outcome.classify(o.errno, o.hw_error).describe()


def labels(bits: Sequence[BitRef], limit: int = 4) -> str:
    text = ", ".join(b.label() for b in bits[:limit])
    return text + (f" and {len(bits) - limit} more" if len(bits) > limit else "")


def predicted_bit(pred: Outcome | None) -> tuple[BitRef, ...]:
    """The bit a prediction names as its reason, if it names one."""
    if pred is None or pred.leaf is None or not pred.register or pred.bit is None:
        return ()
    return (BitRef(pred.leaf, pred.subleaf, pred.register, pred.bit),)


def judge(ctx: Context, req: Request, actual: Outcome, generic: Kind | None,
          what: str, *, td_initialized: bool = False,
          bits: tuple[BitRef, ...] = ()) -> Verdict:
    """Exact knowledge: the kernel's answer must be the mirror's, or refuse where the
    mirror reproduces the policy's known hole (invariant.against_prediction).  Otherwise
    the answer must be of the kind the spec fixes for every kernel (`generic`)."""
    pred = ctx.predict(req, td_initialized=td_initialized)
    got = describe(actual)
    if pred is not None:
        exp = pred.describe()
        agreement = ctx.agreement(req, pred, actual)
        if agreement is Agreement.SAME:
            return ok(f"{what}: {got}", exp, got, bits)
        if agreement is Agreement.STRICTER:
            return ok(f"{what}: {got}; {STRICTER_NOTE}", exp, got, bits)
        return bad(f"{what}: {got}, expected {describe(pred)}", exp, got, bits, request=req,
                   request_note=SECOND_CALL if td_initialized else "")
    if generic is None:
        return skip(f"{what}: {ctx.needs_module}")
    if actual.kind == generic:
        return ok(f"{what}: {got} (no profile: kind only)", generic.value, got, bits)
    return bad(f"{what}: {got}, expected {generic.value}", generic.value, got, bits,
               request=req, request_note=SECOND_CALL if td_initialized else "")

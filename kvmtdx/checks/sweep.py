"""Checks that cover a whole domain: many requests, one fresh TD each, each held to what is
expected of it; the verdict counts them and names the first that was answered otherwise.

What is expected of one request: the mirror's exact answer when the run can predict it
(`exact`), else the kind every kernel gives (`generic`), and where the spec fixes the
errno for every kernel (E2BIG for nent over 256), that errno (`errno_`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import Verdict, bad, describe, ok, skip
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.requests import Request
from kvmtdx.outcome import Kind, Outcome
from kvmtdx.status import errno_name


@dataclass(frozen=True, slots=True)
class Miss:
    label: str
    expected: str
    actual: str
    bits: tuple[BitRef, ...] = ()


def expectation(ctx: Context, req: Request, generic: Kind | None, *, exact: bool = True,
                errno_: int | None = None, td_initialized: bool = False
                ) -> Outcome | Kind | int | None:
    """What `req` must get: a predicted Outcome, else the errno the spec fixes, else a kind
    (None: nothing to judge by)."""
    pred = ctx.predict(req, td_initialized=td_initialized) if exact else None
    if pred is not None:
        return pred
    return errno_ if errno_ is not None else generic


def miss(label: str, want: Outcome | Kind | int | None, got: Outcome,
         bits: tuple[BitRef, ...] = ()) -> Miss | None:
    """None when `got` is what `want` asks for; else what differed."""
    if isinstance(want, Outcome):
        return None if got.same_answer(want) else Miss(label, want.describe(), describe(got),
                                                       bits)
    if isinstance(want, Kind):
        return None if got.kind == want else Miss(label, want.value, describe(got), bits)
    if isinstance(want, int):
        return None if got.errno == want else Miss(label, errno_name(want), describe(got), bits)
    return None


@dataclass
class Sweep:
    """The tally of one domain check."""

    what: str  # "attribute bits", "GPAW values", ...
    tried: int = 0
    unjudged: int = 0
    misses: list[Miss] = field(default_factory=list)
    needs: str = ""  # what an unjudged run lacks (the run's own reason, see Context.needs_module)

    def send(self, ctx: Context, label: str, req: Request, generic: Kind | None, *,
             exact: bool = True, errno_: int | None = None,
             bits: tuple[BitRef, ...] = ()) -> Outcome:
        """`req` on a fresh TD, held to its expectation."""
        want = expectation(ctx, req, generic, exact=exact, errno_=errno_)
        got = ctx.attempt(req)
        self.tried += 1
        if want is None:
            self.unjudged += 1
            self.needs = ctx.needs_module
        else:
            m = miss(label, want, got, bits)
            if m is not None:
                self.misses.append(m)
        return got

    def verdict(self) -> Verdict:
        if self.tried and self.unjudged == self.tried:
            return skip(f"{self.what}: {self.needs}")
        if not self.misses:
            if not self.tried:
                return skip(f"no {self.what} to try")
            return ok(f"{self.tried} {self.what}, one TD each, all answered as expected")
        first = self.misses[0]
        names = ", ".join(m.label for m in self.misses[:4])
        more = f" and {len(self.misses) - 4} more" if len(self.misses) > 4 else ""
        bits = tuple(b for m in self.misses for b in m.bits)
        return bad(f"{len(self.misses)} of {self.tried} {self.what} answered otherwise: "
                   f"{names}{more}; first: {first.label}: {first.actual}, expected "
                   f"{first.expected}", f"{first.label}: {first.expected}",
                   f"{first.label}: {first.actual}", bits)

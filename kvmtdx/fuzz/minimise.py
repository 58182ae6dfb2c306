"""The last cut of a finding: after hypothesis, drop what its scenario does not need.

Hypothesis shrinks the choices that drew a scenario, which cannot always take one entry out
of a request (every later operation would land elsewhere).  This pass works on the scenario
itself: it tries it without each earlier call, without each CPUID entry (then each pair),
with each register and each word KVM must refuse at zero, and keeps every change after
which the same group of discrepancy still shows, until nothing more goes or the tries run
out.  Pure code: the caller says whether a candidate still shows the group (one TD each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from kvmtdx.fuzz.scenario import Scenario, size
from kvmtdx.model.requests import Request
from kvmtdx.structs import REGISTERS, InitVm

_WORDS = ("mrconfigid", "mrowner", "mrownerconfig", "reserved")


def _requests_at(scenario: Scenario) -> Iterator[tuple[int, Request]]:
    for k, s in enumerate(scenario):
        if isinstance(s, Request):
            yield k, s


def _with(scenario: Scenario, k: int, iv: InitVm, *, cmd: bool = True) -> Scenario:
    """Call `k` with `iv` (and, without `cmd`, cmd.flags and hw_error at zero)."""
    step = scenario[k]
    assert isinstance(step, Request)
    changed = replace(step, init_vm=iv) if cmd else \
        replace(step, init_vm=iv, flags=0, hw_error=0)
    return (*scenario[:k], changed, *scenario[k + 1:])


def _zero(iv: InitVm, name: str) -> InitVm:
    words: dict[str, Any] = {name: (0,) * len(getattr(iv, name))}
    return replace(iv, **words)


def candidates(scenario: Scenario) -> Iterator[Scenario]:
    """Smaller scenarios, one change each, the biggest cuts first; the last call (the one
    that departs) stays."""
    for k in range(len(scenario) - 2, -1, -1):
        yield (*scenario[:k], *scenario[k + 1:])
    for k, req in _requests_at(scenario):
        iv = req.init_vm
        if iv.nent is None:  # with a nent of its own, an entry's absence changes the count
            for i in range(len(iv.entries) - 1, -1, -1):
                yield _with(scenario, k, replace(iv, entries=iv.entries[:i] + iv.entries[i + 1:]))
        for i, e in enumerate(iv.entries):
            for r in REGISTERS:
                if e.reg(r):
                    entries = (*iv.entries[:i], e.with_reg(r, 0), *iv.entries[i + 1:])
                    yield _with(scenario, k, replace(iv, entries=entries))
        if iv.nent is None:  # two entries that only go together (a steered entry's filler)
            n = len(iv.entries)
            for i in range(n - 1, -1, -1):
                for j in range(i - 1, -1, -1):
                    kept = tuple(e for x, e in enumerate(iv.entries) if x not in (i, j))
                    yield _with(scenario, k, replace(iv, entries=kept))
        for name in _WORDS:
            if any(getattr(iv, name)):
                yield _with(scenario, k, _zero(iv, name))
        if iv.cpuid_padding:
            yield _with(scenario, k, replace(iv, cpuid_padding=0))
        if req.flags or req.hw_error:
            yield _with(scenario, k, iv, cmd=False)


def minimise(scenario: Scenario, shows: Callable[[Scenario], bool], limit: int) -> Scenario:
    """The smallest scenario reached by taking one thing out at a time while `shows` holds,
    in at most `limit` tries."""
    best, tries = scenario, 0
    failed: set[Scenario] = set()  # never tried twice, so a pass after a cut goes on cheaply
    improved = True
    while improved and tries < limit:
        improved = False
        for cand in candidates(best):
            if tries >= limit:
                break
            if cand in failed or size(cand) >= size(best):
                continue
            tries += 1
            if shows(cand):
                best, improved = cand, True
                break
            failed.add(cand)
    return best

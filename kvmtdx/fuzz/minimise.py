"""The last cut of a finding: after hypothesis, drop what its scenario does not need.

Hypothesis shrinks the choices that drew a scenario, which cannot always take one entry out
of a request (every later operation would land elsewhere).  This pass works on the scenario
itself: it tries it without each earlier call, without CPUID entries (a leaf's at once,
halves, quarters, each one, each pair), with each register and each word KVM must refuse
at zero, with the vCPU path's choices made plain one at a time, and keeps every change
after which the same group of discrepancy still shows, until nothing more goes or the tries
run out.  Pure code: the caller says whether a candidate still shows the group (one TD
each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from kvmtdx.fuzz.scenario import Scenario, VcpuCall, size
from kvmtdx.model.requests import Request
from kvmtdx.structs import REGISTERS, CpuidEntry, InitVm

_WORDS = ("mrconfigid", "mrowner", "mrownerconfig", "reserved")
PAIRS_UP_TO = 12  # entries in a request whose pairs are tried too


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


def _cuts(entries: tuple[CpuidEntry, ...]) -> Iterator[tuple[CpuidEntry, ...]]:
    """`entries` less some of them, the biggest cuts first: every entry of one CPUID leaf
    (a leaf's rows often only work together: 0x1F's topology levels), halves, quarters and
    so on (ddmin's chunks), single entries, then pairs where there are few."""
    n = len(entries)
    for function in dict.fromkeys(e.function for e in entries):
        kept = tuple(e for e in entries if e.function != function)
        if 0 < len(kept) < n - 1:
            yield kept
    size = n // 2
    while size >= 2:
        for start in range(0, n, size):
            yield entries[:start] + entries[start + size:]
        size //= 2
    for i in range(n - 1, -1, -1):
        yield entries[:i] + entries[i + 1:]
    if n <= PAIRS_UP_TO:  # two that only go together (a steered entry and its filler)
        for i in range(n - 1, -1, -1):
            for j in range(i - 1, -1, -1):
                yield tuple(e for x, e in enumerate(entries) if x not in (i, j))


def _plainer(call: VcpuCall) -> Iterator[VcpuCall]:
    """The vCPU path with one choice made plain: no lie, no KVM_SET_CPUID2, room for every
    entry, no fill, the irqchip split."""
    if call.lie is not None:
        yield replace(call, lie=None)
    if call.set_cpuid2:
        yield replace(call, set_cpuid2=False, lie=None)
    plain = VcpuCall()
    for name in ("nent", "fill", "split_irqchip"):
        if getattr(call, name) != getattr(plain, name):
            yield replace(call, **{name: getattr(plain, name)})


def candidates(scenario: Scenario) -> Iterator[Scenario]:
    """Smaller scenarios, one change each, the biggest cuts first; the last call (the one
    that departs) stays, unless it is the vCPU path, which a departure after the TD was
    closed may not need."""
    if scenario and isinstance(scenario[-1], VcpuCall):
        yield scenario[:-1]
    for k in range(len(scenario) - 2, -1, -1):
        yield (*scenario[:k], *scenario[k + 1:])
    for k, step in enumerate(scenario):
        if isinstance(step, VcpuCall):
            for call in _plainer(step):
                yield (*scenario[:k], call, *scenario[k + 1:])
    for k, req in _requests_at(scenario):
        iv = req.init_vm
        if iv.nent is None:  # with a nent of its own, an entry's absence changes the count
            for kept in _cuts(iv.entries):
                yield _with(scenario, k, replace(iv, entries=kept))
        for i, e in enumerate(iv.entries):
            for r in REGISTERS:
                if e.reg(r):
                    entries = (*iv.entries[:i], e.with_reg(r, 0), *iv.entries[i + 1:])
                    yield _with(scenario, k, replace(iv, entries=entries))
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

"""The search: hypothesis draws scenarios, the backend answers, the judge holds each answer to
the mirror, and hypothesis shrinks every group of discrepancies to its smallest scenario.

Hypothesis runs in chunks of CHUNK examples, each seeded from the run's seed, so a run is
bounded by TDs and seconds (hypothesis knows neither) and is the same run again for the
same seed, backend and database.  A discrepancy raises an exception of a class made for its
group (judge.Discrepancy.group): hypothesis tells failures apart by class, so it shrinks
each group on its own.  The engine keeps, per group, the smallest scenario it saw fail
(scenario.size), whatever hypothesis does at the end (a kernel whose state leaks between
TDs can make a replay flaky); a group found in an earlier chunk no longer fails, so later
chunks look for new ones.  Once the budget is spent, examples do nothing, except in a chunk
that is still shrinking what it found.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky, HypothesisWarning

from kvmtdx.device import Kvm, Seam
from kvmtdx.errors import KvmError
from kvmtdx.fuzz import strategies
from kvmtdx.fuzz.execute import Tally, run_scenario
from kvmtdx.fuzz.ground import Ground
from kvmtdx.fuzz.judge import Discrepancy, Model, judge
from kvmtdx.fuzz.minimise import minimise
from kvmtdx.fuzz.result import Budget, End, Finding, Progress, Stats
from kvmtdx.fuzz.scenario import Scenario, size

CHUNK = 250  # examples per hypothesis run
MINIMISE_TRIES = 300  # TDs the last cut of one finding may take


class Departure(Exception):
    """Raised inside hypothesis for a discrepancy; each group gets its own subclass."""


class _Abort(BaseException):
    """The backend failed (not a discrepancy): stops hypothesis at once, shrinking nothing."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Seen:
    scenario: Scenario
    discrepancy: Discrepancy
    first_tds: int
    first_seconds: float
    best_tds: int
    seen: int = 1


@dataclass
class Engine:
    kvm: Kvm
    seam: Seam
    model: Model
    ground: Ground
    budget: Budget
    seed: int
    database: Path | None = None
    progress: Progress | None = None
    tally: Tally = field(default_factory=Tally)
    _seen: dict[tuple[str, ...], _Seen] = field(default_factory=dict)
    _settled: set[tuple[str, ...]] = field(default_factory=set)
    _classes: dict[tuple[str, ...], type[Departure]] = field(default_factory=dict)
    _pending: bool = False
    _examples: int = 0
    _unjudged: int = 0
    _refused: str | None = None  # the vCPU ioctl the backend answered ENOTTY
    _start: float = 0.0
    _shown: float = 0.0

    def run(self) -> tuple[tuple[Finding, ...], Stats]:
        """Search until the budget is spent (KeyboardInterrupt stops it early: the caller
        asks `partial` for what was found)."""
        pin_constants()
        self._start = time.monotonic()
        chunk = 0
        while self._spent() is None:
            self._chunk(chunk)
            chunk += 1
        return self.findings(), self.stats(self._spent() or End.TDS)

    def _chunk(self, chunk: int) -> None:
        self._pending = False
        phases = [Phase.generate, Phase.shrink] if chunk else \
            [Phase.reuse, Phase.generate, Phase.shrink]
        db = DirectoryBasedExampleDatabase(self.database) if self.database is not None else None
        chosen = settings(max_examples=CHUNK, deadline=None, database=db, phases=phases,
                          verbosity=Verbosity.quiet, suppress_health_check=list(HealthCheck),
                          report_multiple_bugs=True, print_blob=False, derandomize=False)

        # @seed under @settings: on top, it would turn the database off (it is meant for
        # reproducing a run; here every run is seeded).
        @chosen
        @hypothesis_seed(self.seed * 1_000_003 + chunk)
        @given(strategies.scenarios(self.ground))
        def example(scenario: Scenario) -> None:
            self._example(scenario)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", HypothesisWarning)
                example()
        except _Abort as e:
            raise e.error from None
        except Exception as e:
            if not _ours(e):
                raise
        self._settled |= set(self._seen)

    def _spent(self) -> End | None:
        if self.budget.first and any(s.discrepancy.verdict.fails for s in self._seen.values()):
            return End.FOUND
        if self.tally.tds >= self.budget.max_tds:
            return End.TDS
        if time.monotonic() - self._start >= self.budget.seconds:
            return End.TIME
        return None

    def _example(self, scenario: Scenario) -> None:
        if not self._pending and self._spent() is not None:
            return
        self._examples += 1
        try:
            observed = run_scenario(self.kvm, self.seam, scenario, self.tally)
        except (OSError, KvmError) as e:
            raise _Abort(e) from e
        j = judge(self.model, scenario, observed)
        self._unjudged += j.unjudged is not None
        self._refused = self._refused or j.vcpu_refused
        for d in j.departures:
            self._note(scenario, d)
        self._show()
        worst = j.worst
        if worst is None or worst.group in self._settled:
            return
        self._pending = True
        raise self._class(worst.group)(f"{worst.expected} / {worst.actual}")

    def _note(self, scenario: Scenario, d: Discrepancy) -> None:
        """Keep the smallest scenario of the discrepancy's group (cut after its call)."""
        cut = scenario[:d.step + 1]
        seen = self._seen.get(d.group)
        now = time.monotonic() - self._start
        if seen is None:
            self._seen[d.group] = _Seen(cut, d, self.tally.tds, now, self.tally.tds)
            return
        seen.seen += 1
        if size(cut) < size(seen.scenario):
            seen.scenario, seen.discrepancy, seen.best_tds = cut, d, self.tally.tds

    def _class(self, group: tuple[str, ...]) -> type[Departure]:
        if group not in self._classes:
            name = f"Departure{len(self._classes)}"
            self._classes[group] = type(name, (Departure,), {"group": group})
        return self._classes[group]

    def _show(self) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self._shown >= 0.1:
            self._shown = now
            self.progress(self.tally.tds, self.tally.init_vm_calls, len(self._seen),
                          now - self._start)

    # What the run came to.

    def findings(self) -> tuple[Finding, ...]:
        return tuple(Finding(s.scenario, s.discrepancy, s.first_tds, s.first_seconds,
                             s.best_tds, s.seen) for s in self._seen.values())

    def stats(self, end: End) -> Stats:
        return self.tally.stats(time.monotonic() - self._start, self._examples,
                                self._unjudged, end, self._refused)

    def _shows(self, scenario: Scenario, group: tuple[str, ...]) -> Discrepancy | None:
        """The scenario on a fresh TD: its departure of `group`, if it shows."""
        observed = run_scenario(self.kvm, self.seam, scenario, self.tally)
        return next((d for d in judge(self.model, scenario, observed).departures
                     if d.group == group), None)

    def minimise(self) -> None:
        """Every group's scenario cut down further (kvmtdx.fuzz.minimise), a TD a try."""
        for s in self._seen.values():
            last: list[Discrepancy] = []

            def shows(cand: Scenario, s: _Seen = s, last: list[Discrepancy] = last) -> bool:
                d = self._shows(cand, s.discrepancy.group)
                if d is not None:
                    last[:] = [d]
                    s.best_tds = self.tally.tds
                return d is not None

            best = minimise(s.scenario, shows, MINIMISE_TRIES)
            if best is not s.scenario and last:
                s.scenario, s.discrepancy = best, last[0]

    def confirm(self, findings: tuple[Finding, ...]) -> tuple[Finding, ...]:
        """Each finding's scenario replayed once more on a fresh TD: does its group show?"""
        return tuple(replace(f, reproduced=self._shows(f.scenario, f.discrepancy.group)
                             is not None) for f in findings)


def pin_constants() -> None:
    """Import every kvmtdx module before the search.  Hypothesis draws, now and then, integers
    it finds in the source of the modules loaded from outside site-packages (an editable
    install's kvmtdx): which ones depends on what the process happens to have imported, so
    the same seed would make another run under pytest than on the command line."""
    import kvmtdx

    for info in pkgutil.walk_packages(kvmtdx.__path__, "kvmtdx."):
        importlib.import_module(info.name)


def _ours(error: BaseException) -> bool:
    """Whether what hypothesis raised is only the run's discrepancies (one, a group of them,
    or one that did not reproduce on hypothesis's last replay)."""
    if isinstance(error, Departure):
        return True
    inner: Any = getattr(error, "exceptions", None)
    if isinstance(error, Flaky) and not inner:
        return True
    return bool(inner) and all(_ours(e) for e in inner)

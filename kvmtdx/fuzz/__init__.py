"""`kvmtdx fuzz`: differential fuzzing of a backend against the mirror.

Each example is one fresh TD: a scenario of one to three calls, sometimes followed by the
vCPU path that reads the TD's CPUID (`scenario`), drawn by hypothesis from what the kernel
reported (`ground`, `strategies`, `strategies_vcpu`), sent to the backend (`execute`) and
held, answer by answer, to the mirror's exact prediction for the TD's state (`judge`),
whose verdicts follow spec section 5's invariant: a kernel stricter than the model where
the invariant allows it is reported apart from one that differs, and from one whose answer
breaks the invariant.  Hypothesis shrinks every group of discrepancies to its smallest
scenario and keeps failing examples in its database (`engine`).

Hypothesis is the `fuzz` extra: only the search needs it (`require_hypothesis`); replaying
saved findings (`run_replay`) does not.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmtdx.cachedir import user_cache
from kvmtdx.device import Kvm, availability
from kvmtdx.errors import DataError, KvmError, MissingExtra
from kvmtdx.fuzz.execute import Tally, run_scenario
from kvmtdx.fuzz.ground import Ground, ground
from kvmtdx.fuzz.judge import Model, judge
from kvmtdx.fuzz.result import Budget, End, Finding, FuzzReport, Progress, Stats, VcpuStats
from kvmtdx.fuzz.scenario import Scenario
from kvmtdx.knowledge import Given, Knowledge, complete
from kvmtdx.session import Backend
from kvmtdx.structs import Capabilities

__all__ = ["Budget", "End", "Finding", "FuzzOptions", "FuzzReport", "Progress", "Stats",
           "VcpuStats", "default_database", "require_hypothesis", "run_fuzz", "run_replay"]

INSTALL_HINT = "pip install 'kvmtdx[fuzz]'"


def require_hypothesis() -> None:
    """MissingExtra (exit 2) naming the extra when hypothesis is not installed."""
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise MissingExtra("kvmtdx fuzz needs hypothesis (it draws and shrinks the requests): "
                           f"{INSTALL_HINT}") from None


@dataclass(frozen=True, slots=True)
class FuzzOptions:
    budget: Budget
    seed: int
    database: Path | None = None  # the root of hypothesis's databases (None: keep nothing)
    stricter_fails: bool = False


@dataclass(frozen=True, slots=True)
class _Opened:
    caps: Capabilities
    knowledge: Knowledge
    model: Model


def _open(kvm: Kvm, known: Given) -> _Opened:
    """What the run judges by: the capabilities of a first TD, completed knowledge, and the
    model, which fuzzing cannot do without."""
    status = availability(kvm)
    if not status.available:
        raise KvmError(status.reason, skip=status.skip)
    with kvm.create_td() as first:
        caps = first.capabilities()
    know = complete(known, caps)
    if know.module is None:
        why = (f"the module profile given does not match this kernel "
               f"({know.module_mismatch})" if know.module_mismatch else "no module profile")
        raise DataError(f"fuzz holds every answer to the mirror's exact prediction, and has "
                        f"{why}: give --module NAME|FILE (kvmtdx caps --save-module FILE "
                        "writes one)")
    if know.policy is None or know.host is None:
        raise DataError(f"fuzz needs the kernel's policy: {know.policy_reason}; give --policy")
    return _Opened(caps, know, Model(know.module, know.host, know.policy, caps.entries,
                                     host_exact=know.host_exact))


def _ground(o: _Opened) -> Ground:
    return ground(o.caps.entries, o.caps.supported_attrs, o.caps.supported_xfam,
                  o.model.module, o.model.host, o.model.policy)


def default_database() -> Path | None:
    """Where hypothesis keeps failing examples unless told: fuzz/ in $KVMTDX_CACHE_DIR, else
    in the XDG cache directory's kvmtdx/, never the working directory, which hypothesis
    would otherwise fill; None where it cannot be made (a run does not fail for want of a
    cache)."""
    root = user_cache("fuzz")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return root if os.access(root, os.W_OK | os.X_OK) else None


def database_for(root: Path, backend: Backend, model: Model) -> Path:
    """One hypothesis database per kernel (backend and release), module, host and policy: a
    failure saved for one kernel is no failure of another, and replaying it there would
    delete it."""
    policy = model.policy
    allow = policy.allowlist.name if policy.allowlist is not None else ""
    key = "|".join((backend.label, platform.release(), model.module.source, model.host.name,
                    policy.name, allow))
    return root / hashlib.sha256(key.encode()).hexdigest()[:16]


def run_fuzz(backend: Backend, known: Given, options: FuzzOptions, *,
             progress: Progress | None = None,
             record: list[FuzzReport] | None = None) -> FuzzReport:
    """Fuzz `backend` within the budget.  On KeyboardInterrupt (SIGINT, SIGTERM) the report
    of what was found so far goes to `record` before the interrupt goes on."""
    from kvmtdx.fuzz.engine import Engine  # hypothesis, only here

    with Kvm(backend.seam, backend.path) as kvm:
        o = _open(kvm, known)
        db = None if options.database is None else database_for(options.database, backend,
                                                                 o.model)
        engine = Engine(kvm, backend.seam, o.model, _ground(o), options.budget, options.seed,
                        database=db, progress=progress)

        def report(findings: tuple[Finding, ...], stats: Stats) -> FuzzReport:
            return FuzzReport(backend.label, o.knowledge, options.seed, options.budget, stats,
                              _ordered(findings), str(db) if db is not None else None,
                              options.stricter_fails)

        try:
            _, stats = engine.run()
            engine.minimise()
            findings = engine.confirm(engine.findings())
        except KeyboardInterrupt:
            if record is not None:
                record.append(report(engine.findings(), engine.stats(End.INTERRUPTED)))
            raise
        return report(findings, stats)


def run_replay(backend: Backend, known: Given, cases: Sequence[tuple[str, Scenario]], *,
               stricter_fails: bool = False) -> FuzzReport:
    """Each saved case sent once to a fresh TD and judged (`kvmtdx fuzz --replay`)."""
    import time

    tally = Tally()
    start = time.monotonic()
    found: list[Finding] = []
    refused: str | None = None
    with Kvm(backend.seam, backend.path) as kvm:
        o = _open(kvm, known)
        for origin, scenario in cases:
            j = judge(o.model, scenario, run_scenario(kvm, backend.seam, scenario, tally))
            refused = refused or j.vcpu_refused
            found += [Finding(scenario[:d.step + 1], d, tally.tds, time.monotonic() - start,
                              tally.tds, 1, True, origin) for d in j.departures]
    stats = tally.stats(time.monotonic() - start, len(cases), 0, End.REPLAYED, refused)
    return FuzzReport(backend.label, o.knowledge, None, None, stats, _ordered(tuple(found)),
                      None, stricter_fails)


def _ordered(findings: tuple[Finding, ...]) -> tuple[Finding, ...]:
    """Those that break the invariant, then other differences, then the stricter ones; each
    kind in the order found."""
    rank = {"breaks_invariant": 0, "differs": 1, "stricter": 2}
    return tuple(sorted(findings, key=lambda f: (rank[f.discrepancy.verdict.value],
                                                 f.found_after_tds)))

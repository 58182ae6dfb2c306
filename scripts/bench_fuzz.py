#!/usr/bin/env python3
"""Benchmark `kvmtdx fuzz` on the simulated host: speed, and how soon each seeded bug is found.

  correct kernels  every bundled module under every policy, one run of the default budget
                   each: TDs, INIT_VM and KVM_TDX_CAPABILITIES calls, calls per second,
                   findings (must be none)
  mutants          every seeded kernel change (kvmtdx.sim.mutants) on module 2.0 under the
                   first policy it names, one run of the default budget per seed: TDs and
                   seconds until the first failing finding, the findings, and the largest
                   shrunk finding (calls on its TD, CPUID entries of its biggest request);
                   the fix must come back with stricter findings only

The margin printed last is the default budget over the most TDs any mutant needed under any
seed.  Exit status 1 when a correct kernel has a finding, a bug is missed or the fix fails.

    scripts/bench_fuzz.py [--seeds N] [--max-tds N] [--mutant NAME ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from kvmtdx.cli.fuzz import DEFAULT_SECONDS, DEFAULT_TDS
from kvmtdx.fuzz import Budget, FuzzOptions, FuzzReport, run_fuzz
from kvmtdx.fuzz.scenario import init_vm_steps
from kvmtdx.knowledge import given
from kvmtdx.model.policy import POLICY_NAMES
from kvmtdx.model.profiles import BUNDLED_MODULES
from kvmtdx.session import open_backend
from kvmtdx.sim.mutants import CATALOGUE, Mutant


@dataclass
class Run:
    report: FuzzReport
    seconds: float


def fuzz(spec: str, seed: int, tds: int) -> Run:
    backend = open_backend(simulate=spec)
    start = time.perf_counter()
    report = run_fuzz(backend, given(backend.simulation),
                      FuzzOptions(Budget(tds, DEFAULT_SECONDS), seed))
    return Run(report, time.perf_counter() - start)


def largest(report: FuzzReport) -> tuple[int, int]:
    """(calls, CPUID entries of the biggest request) over the findings."""
    calls = max((len(f.scenario) for f in report.findings), default=0)
    entries = max((len(r.init_vm.entries) for f in report.findings
                   for r in init_vm_steps(f.scenario)), default=0)
    return calls, entries


def correct_kernels(tds: int) -> bool:
    print(f"correct kernels, default budget ({tds} TDs), seed 1")
    print(f"  {'module:policy':<22} {'TDs':>5} {'INIT_VM':>7} {'CAPS':>5} {'s':>6} "
          f"{'calls/s':>8} findings")
    ok = True
    for module in BUNDLED_MODULES:
        for policy in POLICY_NAMES:
            r = fuzz(f"{module}:{policy}", 1, tds)
            s = r.report.stats
            print(f"  {module + ':' + policy:<22} {s.tds:>5} {s.init_vm_calls:>7} "
                  f"{s.caps_calls:>5} {r.seconds:>6.2f} {s.requests_per_second:>8.0f} "
                  f"{len(r.report.findings)}")
            ok &= not r.report.findings
    return ok


def mutant_row(m: Mutant, seeds: int, tds: int) -> tuple[bool, int]:
    """One line per mutant; whether it was judged right and the most TDs it needed."""
    spec = f"2.0:{m.policies[0]}:{m.name}"
    found_tds: list[str] = []
    worst, ok = 0, True
    findings, calls, entries, seconds = 0, 0, 0, 0.0
    for seed in range(1, seeds + 1):
        r = fuzz(spec, seed, tds)
        failing = r.report.failing()
        c, e = largest(r.report)
        calls, entries = max(calls, c), max(entries, e)
        findings = max(findings, len(r.report.findings))
        if m.fix:
            ok &= not failing and bool(r.report.stricter())
            found_tds.append(f"{len(r.report.stricter())} stricter")
            continue
        first = min(failing, key=lambda f: f.found_after_tds, default=None)
        if first is None:
            ok = False
            found_tds.append("MISSED")
            continue
        worst = max(worst, first.found_after_tds)
        seconds = max(seconds, first.found_after_seconds)
        found_tds.append(str(first.found_after_tds))
    print(f"  {m.name:<38} {'/'.join(found_tds):<18} {seconds:>6.2f} {findings:>8} "
          f"{calls:>5} {entries:>7}")
    return ok, worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-tds", type=int, default=DEFAULT_TDS)
    p.add_argument("--mutant", action="append", default=[])
    a = p.parse_args()
    ok = True if a.mutant else correct_kernels(a.max_tds)
    chosen = [m for m in CATALOGUE if not a.mutant or m.name in a.mutant]
    print(f"\nmutants on module 2.0, default budget ({a.max_tds} TDs), seeds 1-{a.seeds}: TDs "
          "to the first failing finding per seed, the most seconds, the most findings, the "
          "largest shrunk finding (calls, entries)")
    print(f"  {'mutant':<38} {'TDs per seed':<18} {'s':>6} {'findings':>8} {'calls':>5} "
          f"{'entries':>7}")
    worst = 0
    for m in chosen:
        good, w = mutant_row(m, a.seeds, a.max_tds)
        ok &= good
        worst = max(worst, w)
    if worst:
        print(f"\nmost TDs any bug needed: {worst}; default budget {a.max_tds}: "
              f"{a.max_tds / worst:.1f}x margin")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

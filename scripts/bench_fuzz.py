#!/usr/bin/env python3
"""Benchmark `kvmtdx fuzz` on the simulated host: speed, and how soon each seeded bug is found.

  correct kernels  every bundled module under every policy, one run of the default budget
                   each: TDs, INIT_VM and KVM_TDX_CAPABILITIES calls, the vCPU paths and
                   their KVM_TDX_GET_CPUID and KVM_SET_CPUID2 calls, calls per second,
                   findings (must be none)
  mutants          every seeded kernel change (kvmtdx.sim.mutants) on module 2.0 under the
                   first policy it names, per seed: TDs and seconds until the first failing
                   finding (the run stops there, as --first does), the findings shrunk by
                   then, the smallest and the largest of them (CPUID entries of its biggest
                   request) and the most calls on one TD; a fix runs the whole default
                   budget and must come back with stricter findings only

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
from kvmtdx.fuzz import Budget, Finding, FuzzOptions, FuzzReport, run_fuzz
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


def fuzz(spec: str, seed: int, tds: int, *, first: bool = False) -> Run:
    backend = open_backend(simulate=spec)
    start = time.perf_counter()
    report = run_fuzz(backend, given(backend.simulation),
                      FuzzOptions(Budget(tds, DEFAULT_SECONDS, first), seed))
    return Run(report, time.perf_counter() - start)


def entries(f: Finding) -> int:
    """CPUID entries of the finding's biggest request."""
    return max((len(r.init_vm.entries) for r in init_vm_steps(f.scenario)), default=0)


def correct_kernels(tds: int) -> bool:
    print(f"correct kernels, default budget ({tds} TDs), seed 1")
    print(f"  {'module:policy':<22} {'TDs':>5} {'INIT_VM':>7} {'CAPS':>5} {'vCPU':>5} "
          f"{'GET':>4} {'SET':>4} {'s':>6} {'calls/s':>8} findings")
    ok = True
    for module in BUNDLED_MODULES:
        for policy in POLICY_NAMES:
            r = fuzz(f"{module}:{policy}", 1, tds)
            s = r.report.stats
            v = s.vcpu
            print(f"  {module + ':' + policy:<22} {s.tds:>5} {s.init_vm_calls:>7} "
                  f"{s.caps_calls:>5} {v.steps:>5} {v.get_cpuid_calls:>4} "
                  f"{v.set_cpuid2_calls:>4} {r.seconds:>6.2f} {s.requests_per_second:>8.0f} "
                  f"{len(r.report.findings)}")
            ok &= not r.report.findings
    return ok


@dataclass
class Row:
    found: list[str]
    worst: int = 0
    seconds: float = 0.0
    findings: int = 0
    calls: int = 0
    smallest: int = 0
    largest: int = 0
    ok: bool = True

    def add(self, fix: bool, report: FuzzReport) -> None:
        failing = report.failing()
        self.findings = max(self.findings, len(report.findings))
        self.calls = max([self.calls, *(len(f.scenario) for f in report.findings)])
        self.largest = max([self.largest, *(entries(f) for f in report.findings)])
        if fix:
            self.ok &= not failing and bool(report.stricter())
            self.found.append(f"{len(report.stricter())}s")
            return
        first = min(failing, key=lambda f: f.found_after_tds, default=None)
        if first is None:
            self.ok = False
            self.found.append("MISSED")
            return
        self.smallest = max(self.smallest, min(entries(f) for f in failing))
        self.worst = max(self.worst, first.found_after_tds)
        self.seconds = max(self.seconds, first.found_after_seconds)
        self.found.append(str(first.found_after_tds))


def mutant_row(m: Mutant, seeds: int, tds: int) -> Row:
    """One line per mutant, over the seeds."""
    row = Row([])
    for seed in range(1, seeds + 1):
        # A bug's run stops at its first discrepancy (--first): the search up to there is
        # the default run's.  A fix runs the whole budget.
        row.add(m.fix, fuzz(f"2.0:{m.policies[0]}:{m.name}", seed, tds, first=not m.fix).report)
    print(f"  {m.name:<38} {'/'.join(row.found):<26} {row.seconds:>6.2f} {row.findings:>8} "
          f"{row.calls:>5} {row.smallest:>8} {row.largest:>7}")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-tds", type=int, default=DEFAULT_TDS)
    p.add_argument("--mutant", action="append", default=[])
    a = p.parse_args()
    ok = True if a.mutant else correct_kernels(a.max_tds)
    chosen = [m for m in CATALOGUE if not a.mutant or m.name in a.mutant]
    print(f"\nmutants on module 2.0, default budget ({a.max_tds} TDs), seeds 1-{a.seeds}: TDs "
          "to the first failing finding per seed (a fix: Ns, its N stricter findings over the "
          "whole budget), the most seconds, the most findings, the "
          "most calls on one TD, the most entries of a bug's smallest failing finding, the "
          "most entries of any finding")
    print(f"  {'mutant':<38} {'TDs per seed':<26} {'s':>6} {'findings':>8} {'calls':>5} "
          f"{'smallest':>8} {'largest':>7}")
    worst = 0
    for m in chosen:
        row = mutant_row(m, a.seeds, a.max_tds)
        ok &= row.ok
        worst = max(worst, row.worst)
    if worst:
        print(f"\nmost TDs any bug needed: {worst}; default budget {a.max_tds}: "
              f"{a.max_tds / worst:.1f}x margin")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

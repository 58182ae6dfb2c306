#!/usr/bin/env python3
"""Benchmark `kvmtdx probe` on the simulated host: TDs spent against what any prober must spend.

For each bundled module under each policy (and two mutants that make reported
bits fail, so binary splitting has work to do), on the 'max' host:

  targeted   TDs of the default mode (module profile known), and its lower bound
  exhaustive TDs of --exhaustive, its lower bound, and the yardstick
             hidden bits + d*ceil(log2 n) + traps  (n reported units, d of them
             rejected: binary splitting isolates each rejected unit in ceil(log2 n)
             halvings; one TD per lookup trap)
  seconds    wall time of each run, the mirror's expected classes included

Lower bound (for the same set of classified bits).  An INIT_VM answer is one
outcome for the whole request.  A refusal only says "something in here is
refused"; it proves bit b refused only when every other bit of the request that
is not in the base is already known to be accepted.  So each TD certifies at
most one refused bit, and every refused bit (hidden or reported) needs a TD of
its own; the accepted bits need at least one accepted TD between them, and the
capabilities need one TD.  Hence

    LB = 1 + R + [A > 0] + T   (R refused bits, A accepted bits, T lookup traps: each
                               trap asks its own question, which no other answer settles)

The pure counting bound, ceil(log4(#classifications)), is weaker (each answer
has four kinds, and a hidden bit has three possible classes, a reported one
two); it is printed alongside for comparison.

Targets (issue 5): exhaustive within 1.25x of the yardstick; targeted under
150 TDs for a 2.0 module.  Exit status 1 when a target is missed.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from kvmtdx.knowledge import Given
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, load_profile
from kvmtdx.probe import BitClass, ProbeOptions, ProbeResult, probe
from kvmtdx.sim import SimulatedHost

EXTRA = (("2.0", "rfc-v2", "caps_allowlist_unapplied"), ("2.0", "upstream", "denylist_hle_not_rtm"))


@dataclass
class Run:
    result: ProbeResult
    seconds: float


def _run(module: str, policy: str, mutant: str | None, exhaustive: bool) -> Run:
    m, p = load_profile(module), get_policy(policy)
    sim = SimulatedHost(m, MAX_HOST, p, mutant=mutant)
    start = time.perf_counter()
    r = probe(sim, ProbeOptions(exhaustive=exhaustive), label="sim",
              given=Given(module=m, host=MAX_HOST, policy=policy))
    return Run(r, time.perf_counter() - start)


def lower_bound(r: ProbeResult) -> int:
    refused = sum(1 for b in r.bits
                  if b.cls not in (BitClass.REPORTED_ACCEPTED, BitClass.HIDDEN_ACCEPTED))
    refused += sum(1 for f in r.fields if f.cls.value == "FIELD_REJECTED")
    accepted = len(r.bits) + len(r.fields) - refused
    return 1 + refused + (1 if accepted else 0) + len(r.traps)


def counting_bound(r: ProbeResult) -> int:
    reported = sum(1 for b in r.bits if b.reported)
    hidden = len(r.bits) - reported
    return 1 + math.ceil((reported + hidden * math.log2(3)) / 2)


def yardstick(r: ProbeResult) -> int:
    hidden = sum(1 for b in r.bits if not b.reported)
    units = sum(1 for b in r.bits if b.reported) + len(r.fields)
    rejected = sum(1 for b in r.bits if b.cls is BitClass.REPORTED_REJECTED)
    return hidden + rejected * math.ceil(math.log2(max(units, 2))) + len(r.traps)


def main() -> int:
    cases = [(m, p, None) for m in BUNDLED_MODULES for p in POLICY_NAMES] + list(EXTRA)
    print(f"{'module':<9}{'policy':<15}{'mutant':<26}"
          f"{'tgt TDs':>8}{'tgt LB':>7}{'tgt s':>7}  "
          f"{'exh TDs':>8}{'exh LB':>7}{'count LB':>9}{'yard':>6}{'ratio':>7}{'exh s':>7}"
          f"{'ioctls':>8}")
    missed: list[str] = []
    for module, policy, mutant in cases:
        t = _run(module, policy, mutant, False)
        e = _run(module, policy, mutant, True)
        yard = yardstick(e.result)
        ratio = e.result.tds / yard if yard else float("inf")
        print(f"{module:<9}{policy:<15}{mutant or '-':<26}"
              f"{t.result.tds:>8}{lower_bound(t.result):>7}{t.seconds:>7.2f}  "
              f"{e.result.tds:>8}{lower_bound(e.result):>7}{counting_bound(e.result):>9}"
              f"{yard:>6}{ratio:>7.3f}{e.seconds:>7.2f}{e.result.ioctls:>8}")
        if ratio > 1.25:
            missed.append(f"{module}/{policy}/{mutant}: exhaustive {ratio:.3f}x the yardstick")
        if module == "2.0" and t.result.tds >= 150:
            missed.append(f"{module}/{policy}/{mutant}: targeted {t.result.tds} TDs")
    for m in missed:
        print(f"MISSED: {m}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

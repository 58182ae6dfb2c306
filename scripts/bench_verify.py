#!/usr/bin/env python3
"""Benchmark: the whole `kvmtdx verify` suite against the simulated host, per module and policy.

Prints seconds and the deterministic counts (TDs created, ioctls, INIT_VM calls)
per run, so a check that starts creating more TDs shows up as a number, not as
a flaky timing test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmtdx import checks
from kvmtdx.knowledge import given
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, load_profile
from kvmtdx.session import simulated_backend


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--module", action="append", help="bundled module(s) (default: all)")
    p.add_argument("--policy", action="append", help="policies (default: all)")
    p.add_argument("--mutant", help="seed this bug in the simulated host")
    args = p.parse_args()
    print(f"{'module':9} {'policy':14} {'seconds':>8} {'TDs':>6} {'ioctls':>7} "
          f"{'INIT_VM':>7}  verdict")
    for name in args.module or BUNDLED_MODULES:
        for pol in args.policy or POLICY_NAMES:
            backend = simulated_backend(load_profile(name), MAX_HOST, get_policy(pol),
                                        mutant=args.mutant)
            t0 = time.perf_counter()
            r = checks.run_verify(backend.seam, backend_label="sim",
                                  given=given(backend.simulation, policy=pol))
            dt = time.perf_counter() - t0
            s = r.summary
            print(f"{name:9} {pol:14} {dt:8.3f} {s.tds_created:6} {s.ioctls:7} "
                  f"{s.init_vm_calls:7}  {r.verdict} ({s.failed} failed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

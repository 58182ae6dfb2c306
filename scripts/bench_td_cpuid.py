#!/usr/bin/env python3
"""Benchmark: reading a TD's CPUID back, through the simulated host and by the mirror.

Each simulated cycle is what `kvmtdx td-cpuid` and verify's effective group do per TD:
create a TD, KVM_TDX_INIT_VM with the every-reported-bit request, split the irqchip,
create vCPU 0, KVM_TDX_GET_CPUID (grown on E2BIG), close.  The mirror's cycle is the
prediction of the same (`mirror.init_vm_prediction` and `model.get_cpuid.predicted`).
Prints seconds, cycles per second and the deterministic counts (ioctls, TDs, vCPUs and
the entries read) per module and policy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmtdx.device import Kvm
from kvmtdx.model import mirror
from kvmtdx.model.get_cpuid import predicted
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, load_profile
from kvmtdx.sim import SimulatedHost


def bench(module: str, policy: str, cycles: int) -> None:
    m, p = load_profile(module), get_policy(policy)
    req = mirror.full_request(m, MAX_HOST, p)
    sim = SimulatedHost(m, MAX_HOST, p)
    entries = 0
    with Kvm(sim) as kvm:
        t0 = time.perf_counter()
        for _ in range(cycles):
            with kvm.create_td() as td:
                td.init_vm(req.init_vm)
                read = td.read_cpuid()
                assert read.entries is not None, read.describe()
                entries = len(read.entries)
        wall = time.perf_counter() - t0
    c = kvm.counters
    t0 = time.perf_counter()
    for _ in range(cycles):
        want = predicted(m.tables, mirror.init_vm_prediction(m, MAX_HOST, p, req))
    mwall = time.perf_counter() - t0
    assert want is not None and len(want) == entries
    print(f"{module:8} {policy:13} sim {wall:7.3f} s {cycles / wall:8,.0f} TDs read/s  "
          f"ioctls {c.ioctls:,} TDs {c.tds_created:,} vCPUs {c.vcpus_created:,} "
          f"entries {entries}   mirror {mwall:7.3f} s {cycles / mwall:8,.0f} predictions/s")


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--cycles", type=int, default=500, help="TDs per module and policy")
    args = a.parse_args()
    for module in BUNDLED_MODULES:
        for policy in POLICY_NAMES:
            bench(module, policy, args.cycles)
    return 0


if __name__ == "__main__":
    sys.exit(main())

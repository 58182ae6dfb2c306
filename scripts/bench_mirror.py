#!/usr/bin/env python3
"""Benchmark: the mirror's KVM_TDX_INIT_VM predictions per second, per module and policy.

The workload is what verify and probe ask of the mirror: the request with every reported
bit, the minimal request, every unreported feature bit of every listed row alone on the
minimal request (verify's init_vm_unreported_bits_refused), every reported bit alone, and
the lookup traps.  Prints seconds, predictions per second and the deterministic counts
(predictions, and how many of each outcome kind), so a change in what the mirror answers
shows as a number, not as a flaky timing test.  `--repeat N` sends the workload N times
(the second and later rounds show what per-host caching buys).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmtdx.model import builders, mirror
from kvmtdx.model.policy import POLICY_NAMES, Policy, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, Host, ModuleProfile, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import LEAF7_ECX_WAITPKG, bits_of, is_value_register
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, REGISTERS, CpuidEntry


def workload(module: ModuleProfile, host: Host, policy: Policy) -> list[Request]:
    reported = mirror.reported_entries(module, host, policy)
    xfam = mirror.supported_xfam(module, host)
    base = builders.base_request(xfam)
    out = [mirror.full_request(module, host, policy), base]
    for e in reported:
        for r in REGISTERS:
            if is_value_register(e.function, e.index, r):
                continue
            for b in bits_of(0xFFFFFFFF):
                entry = CpuidEntry(e.function, e.index, FLAG_SIGNIFICANT_INDEX)
                out.append(builders.base_request(xfam, (entry.with_reg(r, 1 << b),)))
    for trap in builders.Trap:
        out.append(builders.trap_request(trap, base, reported, ebx=0, ecx=LEAF7_ECX_WAITPKG))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--module", action="append", help="bundled module(s) (default: all)")
    p.add_argument("--policy", action="append", help="policies (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the workload (default 1)")
    args = p.parse_args()
    print(f"{'module':9} {'policy':14} {'predictions':>11} {'seconds':>8} {'per second':>10}"
          "  outcomes")
    total_n, total_t = 0, 0.0
    for name in args.module or BUNDLED_MODULES:
        module = load_profile(name)
        for pol in args.policy or POLICY_NAMES:
            policy = get_policy(pol)
            requests = workload(module, MAX_HOST, policy)
            kinds: Counter[str] = Counter()
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                for req in requests:
                    kinds[mirror.predict_init_vm(module, MAX_HOST, policy, req).kind.value] += 1
            dt = time.perf_counter() - t0
            n = len(requests) * args.repeat
            total_n, total_t = total_n + n, total_t + dt
            tally = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            print(f"{name:9} {pol:14} {n:11} {dt:8.3f} {n / dt:10.0f}  {tally}")
    print(f"{'all':24} {total_n:11} {total_t:8.3f} {total_n / total_t:10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

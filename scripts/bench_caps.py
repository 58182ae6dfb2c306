#!/usr/bin/env python3
"""Benchmark: `kvmtdx caps` end to end (KVM_TDX_CAPABILITIES with grow-and-retry, decoding,
naming every bit) against the simulated host, or the real device with --real.

Prints seconds and the deterministic counts (ioctls, TDs created) per run, so a
change in the retry policy shows up as a number, not as a flaky timing test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmtdx.errors import KvmError
from kvmtdx.hostinfo import read_capabilities
from kvmtdx.report import caps as render
from kvmtdx.session import open_backend


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--simulate", default="2.0:rfc-v2", help="MODULE[:POLICY] (default 2.0:rfc-v2)")
    p.add_argument("--real", action="store_true", help="use /dev/kvm instead")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--start-nent", type=int, default=6)
    args = p.parse_args()
    ioctls = tds = 0
    t0 = time.perf_counter()
    try:
        for _ in range(args.runs):
            backend = open_backend(simulate=None if args.real else args.simulate)
            reading = read_capabilities(backend, start_nent=args.start_nent)
            render.render_text(reading.caps, backend.label, reading.counters)
            ioctls += reading.counters.ioctls
            tds += reading.counters.tds_created
    except KvmError as e:
        print(f"skip: {e.reason}", file=sys.stderr)
        return 4
    dt = time.perf_counter() - t0
    print(f"runs {args.runs}  seconds {dt:.3f}  per run {dt / args.runs * 1e3:.2f} ms  "
          f"ioctls {ioctls} ({ioctls // args.runs}/run)  TDs created {tds}  "
          f"entries {len(reading.caps.entries)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

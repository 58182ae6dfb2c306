#!/usr/bin/env python3
"""Benchmark: simulated KVM_TDX_CAPABILITIES and KVM_TDX_INIT_VM per second, full stack.

With --kernel-source TREE (default: the Linux 7.3 files scripts/fetch-kernel-source
keeps, when present) the same calls also go to the kernel-source backend (the
tree's own TDX code; rfc-v2 runs it with the bundled rfc-v2 patch), so the
simulated host's speed is judged against the kernel's own code in one run.

Every call goes the whole way a command's would: the device layer packs the
request into memory, the seam carries the address, the simulated host reads
the caller's bytes, runs the kernel's and the module's checks and writes back.
INIT_VM runs on a fresh TD each time (create, INIT_VM, close), as a prober
does, cycling through the valid request and every single-bit variant of its
reported rows, so accepted and rejected paths both count.

Prints seconds, calls per second (wall and CPU time of this one process) and
the deterministic counts (ioctls, TDs created, outcomes) from device.Counters.
Target (issue 4): at least 5,000 INIT_VM per second for the 28-row 2.0 module.
Exit status 1 when a run misses it (with --check).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmtdx.device import Kvm, Seam
from kvmtdx.model import mirror
from kvmtdx.model.policy import POLICY_NAMES, get_policy
from kvmtdx.model.profiles import MAX_HOST, ModuleProfile, load_profile
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import REGISTERS, InitVm

TARGET_INIT_VM_PER_S = 5000
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TREE = ROOT / ".cache" / "linux-source" / "linux-source-7.3"


def variants(base: InitVm) -> list[InitVm]:
    """The valid request, then each of its entries with one bit toggled (every bit)."""
    out = [base]
    for i, e in enumerate(base.entries):
        for r in REGISTERS:
            for bit in range(32):
                flipped = e.with_reg(r, e.reg(r) ^ 1 << bit)
                out.append(replace(base, entries=(*base.entries[:i], flipped,
                                                  *base.entries[i + 1:])))
    return out


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:10,.0f}/s" if seconds > 0 else "       inf/s"


def kernel_seam(tree: Path | None, module: ModuleProfile,
                policy: str) -> tuple[str, Seam] | None:
    """The kernel-source backend for `policy` (upstream-6.16 has no tree here)."""
    if tree is None or policy == "upstream-6.16":
        return None
    from kvmtdx.kernelsrc import open_backend

    w0 = time.perf_counter()
    b = open_backend(tree, ["rfc-v2"] if policy == "rfc-v2" else [], module, MAX_HOST)
    how = "compiled" if b.compiled else "from the cache"
    print(f"  kernel source {b.version}: library {how} in {time.perf_counter() - w0:.3f} s")
    return "kernel", b.seam


def run(name: str, seam: Seam, caps: int, init_vm: int, rows: int,
        requests: list[InitVm]) -> float | None:
    """Time both ioctls through the device stack; the INIT_VM CPU seconds, None on a leak."""
    with Kvm(seam) as kvm:
        td = kvm.create_td()
        with td:
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(caps):
                td.capabilities_raw(rows)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    caps_counts = kvm.counters
    outcomes: Counter[str] = Counter()
    with Kvm(seam) as kvm:
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(init_vm):
            with kvm.create_td() as td:
                outcomes[td.init_vm(requests[i % len(requests)]).kind.value] += 1
        iwall, icpu = time.perf_counter() - w0, time.process_time() - c0
    init_counts = kvm.counters
    print(f"  {name:6} CAPABILITIES {caps:7,} calls {wall:7.3f} s wall {rate(caps, wall)}"
          f"  {cpu:7.3f} s cpu {rate(caps, cpu)}"
          f"  ioctls {caps_counts.ioctls:,}  TDs created {caps_counts.tds_created}")
    print(f"  {name:6} INIT_VM      {init_vm:7,} calls {iwall:7.3f} s wall "
          f"{rate(init_vm, iwall)}  {icpu:7.3f} s cpu {rate(init_vm, icpu)}"
          f"  ioctls {init_counts.ioctls:,}  TDs created {init_counts.tds_created:,}")
    print(f"  {name:6} INIT_VM outcomes "
          + ", ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items()))
          + f"  (cycle of {len(requests):,} requests)")
    if getattr(seam, "open_fds", ()) or getattr(seam, "live_tds", 0):
        print(f"  LEAK: the {name} backend still has fds open", file=sys.stderr)
        return None
    return icpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", default="2.0", help="bundled module (default 2.0)")
    p.add_argument("--policy", action="append", choices=POLICY_NAMES,
                   help="policies (default: all)")
    p.add_argument("--caps", type=int, default=5000, help="CAPABILITIES calls per policy")
    p.add_argument("--init-vm", type=int, default=20000, help="INIT_VM calls per policy")
    p.add_argument("--check", action="store_true",
                   help=f"exit 1 if INIT_VM runs below {TARGET_INIT_VM_PER_S}/s (CPU time)")
    p.add_argument("--kernel-source", metavar="TREE", type=Path,
                   default=DEFAULT_TREE if DEFAULT_TREE.is_dir() else None,
                   help="also run a Linux tree's own TDX code (default: .cache's 7.3 if fetched)")
    args = p.parse_args()
    module = load_profile(args.module)
    print(f"module {module.name} ({len(module.rows)} rows), host {MAX_HOST.name}")
    missed = False
    for pol in args.policy or POLICY_NAMES:
        policy = get_policy(pol)
        requests = variants(mirror.full_request(module, MAX_HOST, policy).init_vm)
        seams: list[tuple[str, Seam]] = [
            ("sim", SimulatedHost(module, MAX_HOST, policy, key_ids=16))]
        print(f"policy {pol}")
        kernel = kernel_seam(args.kernel_source, module, pol)
        if kernel is not None:
            seams.append(kernel)
        for name, seam in seams:
            icpu = run(name, seam, args.caps, args.init_vm, len(module.rows), requests)
            if icpu is None:
                return 1
            if name == "sim" and icpu > 0 and args.init_vm / icpu < TARGET_INIT_VM_PER_S:
                missed = True
    if args.check and missed:
        print(f"below the target of {TARGET_INIT_VM_PER_S} INIT_VM/s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

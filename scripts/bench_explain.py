#!/usr/bin/env python3
"""Benchmark: `kvmtdx explain` on its heaviest inputs.

- the replay of a worst-case request (every bit of every register of every module row set,
  value registers included), which costs one prediction per fault it finds;
- scanning a long pasted log (kernel, QEMU, libvirt, cloud-hypervisor lines and noise).

Prints seconds and the deterministic counts (faults, replays, lines, findings).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmtdx.explain.diagnose import diagnose
from kvmtdx.explain.logs import scan
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import gpaw_entry
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, CpuidEntry, InitVm

LOG_LINES = (
    "[ 8812.553190] WARNING: CPU: 17 PID: 30211 at arch/x86/kvm/vmx/tdx.c:2617 __tdx_td_init+0x5c1",
    "[ 8812.553412] kvm_intel: SEAMCALL TDH_MNG_INIT failed: 0xc00009210000010a, rcx 0x0",
    "qemu-system-x86_64: TDX ioctl KVM_TDX_INIT_VM failed, hw_errors: 0xc000010000000045: "
    "Invalid argument",
    "error: internal error: QEMU unexpectedly closed the monitor (vm='td'): qemu-system-x86_64: "
    "TDX ioctl KVM_TDX_INIT_VM failed, hw_errors: 0x0: Input/output error",
    "cloud-hypervisor: ERROR -- Failed to initialize TDX: Invalid argument (os error 22)",
    "RIP: 0010:__tdx_td_init+0x5c1/0x7a0 RAX: 0000000000000000 RCX: ffffffffc0a1b2c3",
    "systemd[1]: Started libvirtd.service - libvirt legacy monolithic daemon.",
)


def worst_request(module_name: str) -> Request:
    module = load_profile(module_name)
    entries = [CpuidEntry(r.leaf, r.kvm_index, 0 if r.subleaf is None else FLAG_SIGNIFICANT_INDEX,
                          0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
               for r in module.rows if r.leaf != 0x80000008]
    return Request(init_vm=InitVm(attributes=0x10000000, xfam=0x3,
                                  entries=(*entries, gpaw_entry(48))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--module", default="2.0")
    p.add_argument("--policy", default="upstream")
    p.add_argument("--log-lines", type=int, default=100_000)
    args = p.parse_args()
    module, policy = load_profile(args.module), get_policy(args.policy)
    t0 = time.perf_counter()
    d = diagnose(module, MAX_HOST, policy, worst_request(args.module))
    dt = time.perf_counter() - t0
    bits = sum(len(f.bits) for f in d.faults)
    print(f"replay  module {module.name} policy {policy.name}: {len(d.faults)} faults "
          f"({bits} bits), {d.replays} replays, final {d.final.kind.value}, {dt:.3f} s "
          f"({d.replays / dt:.0f} predictions/s)")
    text = "\n".join(LOG_LINES[i % len(LOG_LINES)] for i in range(args.log_lines))
    t0 = time.perf_counter()
    found = scan(text, "bench")
    dt = time.perf_counter() - t0
    print(f"scan    {args.log_lines} lines: {len(found)} findings, {dt:.3f} s "
          f"({args.log_lines / dt:.0f} lines/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

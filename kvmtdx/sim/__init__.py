"""The simulated TDX host: /dev/kvm, VM file descriptors and a TDX module behind the seam.

`SimulatedHost` answers open/ioctl/close the way a Linux kernel of a given
policy, running a given TDX module on a given CPU, answers them.  It is
written as operational code in the kernel's own order (Linux 7.3
arch/x86/kvm/vmx/tdx.c and cpuid.c; the behaviour contract, sections 3 and 4),
reads and writes the caller's memory at the addresses it is handed, and keeps
per-VM state (initialised or not, dead after a module error, the TDX key ID a TD
holds, the TD's CPUID as the module left it) and the kernel's WARNs (`kernel_warnings`,
`kernel_log`).

It deliberately knows nothing of `kvmtdx.model.mirror` (nor of the rules and
request builders the mirror uses, nor of the model's TDX module): the mirror
predicts, this package behaves, and the test suite holds each to the other.  Both
start from the same facts (the module's converted tables, host, policy, allowlist)
and nothing more.

The package, one job a module: `host` (the seam and its fd table), `uaccess`
(the caller's memory), `state` (VMs and key IDs), `kvm` (/dev/kvm and VM
ioctls), `tdx` (KVM_MEMORY_ENCRYPT_OP: CAPABILITIES, FINALIZE_VM), `td_init`
(KVM_TDX_INIT_VM, step by step), `tables` (what KVM works out per module row
at bring-up), `tdx_module` (the simulated TDX module: what it reports and
TDH.MNG.INIT's configuration checks), `tdx_platform` (its TDH.SYS.INIT on the host),
`tdx_cpuid` (TDH.MNG.INIT's CPUID loop and leaf 0x1F), `facts` (the constants KVM
applies) and `mutants` (seeded kernel bugs that switch single decisions,
so the verifier can prove it catches them).
"""

from __future__ import annotations

from typing import Any

from kvmtdx.model.policy import POLICY_NAMES
from kvmtdx.model.profiles import BUNDLED_MODULES
from kvmtdx.sim.host import SimulatedHost
from kvmtdx.sim.mutants import CATALOGUE, MUTANTS, Mutant

__all__ = ["CATALOGUE", "MUTANTS", "Mutant", "SimulatedHost", "choices"]


def choices() -> dict[str, Any]:
    """What `--simulate MODULE[:POLICY[:MUTANT]]` accepts (`--simulate list`)."""
    return {
        "modules": list(BUNDLED_MODULES),
        "policies": list(POLICY_NAMES),
        "mutants": [{"name": m.name, "description": m.description,
                     "policies": list(m.policies)} for m in CATALOGUE],
    }

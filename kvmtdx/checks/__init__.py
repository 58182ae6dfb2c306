"""The conformance suite behind `kvmtdx verify`: named checks with structured results.

Every check talks to the kernel only through the device layer (a Kvm handle
on any seam: the real /dev/kvm, the simulated host, a plug-in) and judges the
answers in one of two ways:

- against the mirror's exact prediction, when the module profile, the host and
  the kernel policy are known ("exact" knowledge);
- against the kernel-independent invariant of spec section 5 (bits inside what
  KVM_TDX_CAPABILITIES reported are ACCEPTED together; a bit outside it is never
  ACCEPTED: kvmtdx.model.invariant), which needs no profile at all.

A check that needs knowledge the run lacks is a skip that says what to supply.
The checks live one module per group (GROUPS order); adding a check touches only
its group's module.  Every TD a check creates is closed on every path.
"""

from __future__ import annotations

# Each group module registers its checks on import.
from kvmtdx.checks import (  # noqa: F401
    adversarial,
    availability,
    capabilities,
    effective,
    hygiene,
    init_vm_content,
    init_vm_structure,
    lifecycle,
    policy,
)
from kvmtdx.checks.registry import GROUPS, CheckSpec, registered, select
from kvmtdx.checks.result import CheckResult, Summary, VerifyReport
from kvmtdx.checks.runner import Progress, run_verify

CHECKS: tuple[CheckSpec, ...] = registered()

__all__ = ["CHECKS", "GROUPS", "CheckResult", "CheckSpec", "Progress", "Summary",
           "VerifyReport", "run_verify", "select"]

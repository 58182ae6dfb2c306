"""availability: KVM offers the TDX VM type (the suite runs only when it does)."""

from __future__ import annotations

from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import Verdict, check, ok


@check("tdx_available", "availability", "KVM offers KVM_X86_TDX_VM")
def tdx_available(ctx: Context) -> Verdict:
    # Reaching the checks means the device opened and listed the TDX VM type; when it
    # did not, the runner reports this check (a skip or a failure) without running any.
    return ok(f"KVM API 12, VM types 0x{ctx.kvm.vm_types():x}, TDX offered")

"""availability: KVM offers the TDX VM type (the suite runs only when it does), and the module
profile the run judges by can be the module behind what KVM reported."""

from __future__ import annotations

from kvmtdx.checks.context import NEEDS_MODULE, Context
from kvmtdx.checks.registry import Verdict, bad, check, ok, skip


@check("tdx_available", "availability", "KVM offers KVM_X86_TDX_VM")
def tdx_available(ctx: Context) -> Verdict:
    # Reaching the checks means the device opened and listed the TDX VM type; when it
    # did not, the runner reports this check (a skip or a failure) without running any.
    return ok(f"KVM API 12, VM types 0x{ctx.kvm.vm_types():x}, TDX offered")


@check("module_profile_matches", "availability",
       "the module profile given can be this host's module: its rows, the bits it lists, its "
       "fixed attribute and XFAM bits (else the checks that need it skip)")
def module_profile_matches(ctx: Context) -> Verdict:
    k = ctx.know
    if k.module_mismatch is not None:
        return bad(f"{k.module_mismatch}: the module profile given is not this host's module; "
                   "the checks that need one skip (kvmtdx caps --save-module FILE writes this "
                   "host's)", "a profile of this host's module", k.module_mismatch)
    if k.module is None:
        return skip(NEEDS_MODULE)
    return ok(f"{len(k.module.rows)} rows as module {k.module.name} lists them; every reported "
              "bit one it lists")

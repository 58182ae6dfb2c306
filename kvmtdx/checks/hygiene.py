"""hygiene: what the run left behind, judged once the KVM handle and every TD are closed."""

from __future__ import annotations

from kvmtdx.checks.context import Context
from kvmtdx.checks.registry import Verdict, bad, check, ok

GROUP = "hygiene"
MIB = 1024 * 1024


@check("hygiene_tds_closed", GROUP, "every VM and vCPU fd opened was closed", after_close=True)
def hygiene_tds_closed(ctx: Context) -> Verdict:
    c = ctx.kvm.counters
    live = getattr(ctx.seam, "live_tds", None)
    vcpus = getattr(ctx.seam, "live_vcpus", None)
    if c.opens != c.closes:
        return bad(f"{c.opens} opens, {c.closes} closes", str(c.opens), str(c.closes))
    if isinstance(live, int) and live:
        return bad(f"the backend still holds {live} TDs", "0", str(live))
    if isinstance(vcpus, int) and vcpus:
        return bad(f"the backend still holds {vcpus} vCPUs", "0", str(vcpus))
    made = f" and {c.vcpus_created} vCPUs" if c.vcpus_created else ""
    return ok(f"{c.tds_created} TDs{made} created, all closed")


@check("hygiene_key_ids_released", GROUP,
       "no TDX key ID is left behind: none ran out, and the backend has them all back",
       after_close=True)
def hygiene_key_ids_released(ctx: Context) -> Verdict:
    free = ctx.free_key_ids()
    if ctx.enospc:
        return bad(f"{ctx.enospc} INIT_VM calls got ENOSPC: TDX key IDs ran out "
                   "(a key ID leaks)", "0 ENOSPC", f"{ctx.enospc} ENOSPC")
    if isinstance(free, int) and ctx.key_ids_before is not None and free != ctx.key_ids_before:
        return bad(f"{ctx.key_ids_before - free} key IDs not returned",
                   str(ctx.key_ids_before), str(free))
    return ok("no ENOSPC" + (f"; {free} key IDs free as before" if isinstance(free, int)
                             else ""))


@check("hygiene_fds_released", GROUP,
       "the process has no more open file descriptors than before the run", after_close=True)
def hygiene_fds_released(ctx: Context) -> Verdict:
    p = ctx.proc
    rss = f"RSS {p.rss_before // MIB} MiB -> {p.rss_after // MIB} MiB"
    if p.fds_after > p.fds_before:
        return bad(f"{p.fds_after - p.fds_before} fds left open; {rss}",
                   str(p.fds_before), str(p.fds_after))
    return ok(f"{p.fds_after} fds as before; {rss}")

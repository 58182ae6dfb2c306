"""Rendering for the simulated host: `--simulate list` and the outcome of `kvmtdx init-vm`."""

from __future__ import annotations

from typing import Any

from kvmtdx.identity import HostIdentity
from kvmtdx.model.policy import get_policy
from kvmtdx.outcome import Outcome
from kvmtdx.report.encode import host_identity_json, outcome_json
from kvmtdx.report.schema import ReportKind, document
from kvmtdx.session import DEFAULT_SIM_POLICY, InitVmRun


def choices_json(choices: dict[str, Any]) -> str:
    return document(ReportKind.SIMULATE_LIST, choices)


def choices_text(choices: dict[str, Any]) -> str:
    lines = ["kvmtdx --simulate MODULE[:POLICY[:MUTANT]]", "", "modules (or a module JSON file):"]
    lines += [f"  {m}" for m in choices["modules"]]
    lines += ["", f"policies (default {DEFAULT_SIM_POLICY}):"]
    for name in choices["policies"]:
        p = get_policy(name)
        lines.append(f"  {name:<15} {p.kernels}: {p.description}")
    lines += ["", "mutants (seeded kernel bugs; [...] names the policies they change):"]
    width = max((len(m["name"]) for m in choices["mutants"]), default=0)
    lines += [f"  {m['name']:<{width}}  {m['description']}" for m in choices["mutants"]]
    return "\n".join(lines) + "\n"


def _decoded(o: Outcome) -> dict[str, Any] | None:
    hw = o.hw
    return None if not o.hw_error else {
        "status": hw.status_name,
        "operand": hw.operand,
        "operand_name": hw.operand_name,
    }


def init_vm_to_json(run: InitVmRun) -> dict[str, Any]:
    """The keys of `predict`'s init_vm, plus the module status decoded, whether the kernel
    WARNed and the VM is bugged; a replay of a TD's history adds the earlier calls' answers
    ("before"); a backend that counts TDX key IDs adds how many were free around the calls
    ("key_ids")."""
    o = run.outcome
    doc = outcome_json(o)
    doc["hw_error_decoded"] = _decoded(o)
    doc["kernel_warn"] = None if run.kernel_warnings is None else run.kernel_warnings > 0
    doc["vm_bugged"] = run.vm_bugged
    if run.before:
        doc["before"] = [{**outcome_json(b), "hw_error_decoded": _decoded(b)}
                         for b in run.before]
    k = run.key_ids
    doc["key_ids"] = None if k is None else {
        "free_before": k.before, "free_after_calls": k.after_calls,
        "free_after_close": k.after_close}
    return doc


def init_vm_json(run: InitVmRun, identity: HostIdentity) -> str:
    return document(ReportKind.INIT_VM, init_vm_to_json(run), host_identity_json(identity))


def init_vm_text(run: InitVmRun) -> str:
    o = run.outcome
    where = "a fresh TD" if not run.before else \
        f"a TD after {len(run.before)} earlier INIT_VM call{'s' if len(run.before) > 1 else ''}"
    lines = [f"KVM_TDX_INIT_VM on {where} ({run.backend})"]
    lines += [f"  before {k + 1}  {b.describe()}" for k, b in enumerate(run.before)]
    lines += [
        f"  outcome   {o.kind.value}",
        f"  errno     {o.errno_name or 0}",
        f"  hw_error  {o.hw}",
    ]
    if run.kernel_warnings is not None:
        lines.append(f"  kernel    {run.kernel_warnings} WARN splat(s) during the call"
                     + (" (the kernel is now tainted)" if run.kernel_warnings else ""))
    if run.vm_bugged is not None:
        lines.append("  VM        " + ("marked bugged: every later ioctl on it fails with EIO"
                                      if run.vm_bugged else "still answers ioctls"))
    k = run.key_ids
    if k is not None:
        lines.append(f"  key IDs   {k.before} free before, {k.after_calls} after the calls, "
                     f"{k.after_close} once the TD was closed")
    lines.append(f"  ioctls    {run.counters.ioctls}, TDs created {run.counters.tds_created}")
    return "\n".join(lines) + "\n"

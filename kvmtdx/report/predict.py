"""Rendering of `kvmtdx predict`: the mirror's capabilities and, with a request, INIT_VM."""

from __future__ import annotations

from typing import Any

from kvmtdx.model import catalog
from kvmtdx.model.mirror import CapsPrediction
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile
from kvmtdx.model.rules import is_value_register
from kvmtdx.outcome import Outcome
from kvmtdx.report import hx
from kvmtdx.report.encode import allowlist_ref_json, capabilities_json, outcome_json
from kvmtdx.report.schema import ReportKind, document
from kvmtdx.status import errno_name
from kvmtdx.structs import REGISTERS


def render_json(module: ModuleProfile, host: Host, policy: Policy, caps: CapsPrediction,
                outcome: Outcome | None) -> str:
    doc: dict[str, Any] = {
        "module": module.name,
        "policy": policy.name,
        "allowlist": allowlist_ref_json(policy),
        "host": host.name,
        "capabilities": capabilities_json(caps.caps) if caps.caps else None,
    }
    if caps.errno:
        doc["capabilities_errno"] = errno_name(caps.errno)
    if outcome is not None:
        doc["init_vm"] = outcome_json(outcome)
    return document(ReportKind.PREDICT, doc)


def _row_subleaf(module: ModuleProfile, i: int) -> int | None:
    return module.rows[i].subleaf if i < len(module.rows) else None


def render_text(module: ModuleProfile, host: Host, policy: Policy, caps: CapsPrediction,
                outcome: Outcome | None) -> str:
    name = catalog.bit_name
    out = [
        f"module  {module.name}  ({module.source})",
        f"policy  {policy.name}  ({policy.kernels}: {policy.description})",
        f"host    {host.name}",
    ]
    if policy.allowlist is not None:
        out.append(f"allowlist {policy.allowlist.name}: {policy.allowlist.provenance}")
    out.append("")
    if caps.caps is None:
        out.append(f"KVM_TDX_CAPABILITIES fails: -{errno_name(caps.errno)}")
    else:
        c = caps.caps
        out.append(f"KVM_TDX_CAPABILITIES: {c.nent} entries")
        out.append(f"  supported_attrs  {hx(c.supported_attrs, 16)}  "
                   + " ".join(catalog.attribute_names(c.supported_attrs)))
        out.append(f"  supported_xfam   {hx(c.supported_xfam, 16)}  "
                   + " ".join(catalog.xfam_names(c.supported_xfam)))
        out.append(f"  user_tdvmcallinfo_1_r11 {hx(c.user_tdvmcallinfo_1_r11, 1)}")
        for i, e in enumerate(c.entries):
            sub = _row_subleaf(module, i)
            label = f"0x{e.function:x}" + ("" if sub is None else f".{e.index}")
            out.append(f"  leaf {label}")
            for r, v in zip(REGISTERS, e.regs(), strict=True):
                if not v:
                    continue
                kind = "fields" if is_value_register(e.function, sub, r) else "features"
                names = " ".join(catalog.describe(e.function, sub, r, v))
                out.append(f"    {r} {hx(v)}  {kind}: {names}")
    if outcome is not None:
        out.append("")
        out.append(f"KVM_TDX_INIT_VM: {outcome.describe()}")
        if outcome.leaf is not None and outcome.register and outcome.bit is not None \
                and outcome.check not in ("gpaw_value", "gpaw_5level"):
            out.append("  bit: " + name(outcome.leaf, outcome.subleaf, outcome.register,
                                        outcome.bit))
    return "\n".join(out) + "\n"

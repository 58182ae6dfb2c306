"""Rendering of `kvmtdx predict`: the mirror's capabilities and, with a request, INIT_VM.

With a request the report says what KVM answers and why, what TDH.MNG.INIT decided
(status, rule, source), what KVM makes of a status that is not an invalid operand
(a kernel WARN, a bugged VM), and for an accepted TD its effective CPUID: in text
the requested bits the TD does not get as asked, by name and reason; in JSON every
leaf the module virtualises (`effective_cpuid`) and those changes (`cpuid_changes`).
"""

from __future__ import annotations

from typing import Any

from kvmtdx.model import catalog
from kvmtdx.model import tdx_status as st
from kvmtdx.model.mirror import CapsPrediction, InitVmPrediction
from kvmtdx.model.policy import Policy
from kvmtdx.model.profiles import Host, ModuleProfile, kernel_note
from kvmtdx.model.rules import bits_of, is_value_register
from kvmtdx.model.tdx_module import Change
from kvmtdx.outcome import Kind
from kvmtdx.report import hx
from kvmtdx.report.encode import allowlist_ref_json, capabilities_json, outcome_json
from kvmtdx.report.schema import ReportKind, document
from kvmtdx.status import errno_name
from kvmtdx.structs import REGISTERS

# How a change reads in text (Change.kind).
CHANGE_WORDS = {"cleared": "cleared silently", "forced_1": "forced to 1",
                "overridden": "overridden"}


def module_json(p: InitVmPrediction) -> dict[str, Any] | None:
    """What TDH.MNG.INIT decided and what KVM made of it (None: KVM refused first)."""
    if p.status is None:
        return None
    return {"status": hx(p.status, 16), "status_name": st.status_name(p.status),
            "rule": p.rule, "source": p.source, "rcx": hx(p.rcx, 16),
            "kernel_warn": p.warns, "vm_bugged": p.vm_bugged}


def _regs_json(leaf: int, subleaf: int | None, regs: tuple[int, int, int, int],
               faulting: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"leaf": f"0x{leaf:x}", "subleaf": subleaf}
    out.update({r: hx(v) for r, v in zip(REGISTERS, regs, strict=True)})
    out["faulting"] = faulting
    return out


def change_json(c: Change) -> dict[str, Any]:
    return {"leaf": f"0x{c.leaf:x}", "subleaf": c.subleaf, "register": c.register,
            "mask": hx(c.mask), "kind": c.kind, "reason": c.reason,
            "bits": [catalog.bit_name(c.leaf, c.subleaf, c.register, b)
                     for b in bits_of(c.mask)]}


def render_json(module: ModuleProfile, host: Host, policy: Policy, caps: CapsPrediction,
                pred: InitVmPrediction | None) -> str:
    note = kernel_note(module)
    doc: dict[str, Any] = {
        "module": module.name,
        "policy": policy.name,
        "allowlist": allowlist_ref_json(policy),
        "host": host.name,
        "module_version": module.version,
        "notes": [note] if note else [],
        "capabilities": capabilities_json(caps.caps) if caps.caps else None,
    }
    if caps.errno:
        doc["capabilities_errno"] = errno_name(caps.errno)
    if pred is not None:
        doc["init_vm"] = outcome_json(pred.outcome)
        doc["init_vm"]["module"] = module_json(pred)
        eff = pred.effective
        doc["effective_cpuid"] = None if eff is None else [
            _regs_json(leaf, sub, regs, (leaf, sub) in pred.faulting)
            for (leaf, sub), regs in eff.items()]
        doc["cpuid_changes"] = [change_json(c) for c in pred.changes]
    return document(ReportKind.PREDICT, doc)


def _row_subleaf(module: ModuleProfile, i: int) -> int | None:
    return module.rows[i].subleaf if i < len(module.rows) else None


def caps_text(module: ModuleProfile, caps: CapsPrediction) -> list[str]:
    if caps.caps is None:
        return [f"KVM_TDX_CAPABILITIES fails: -{errno_name(caps.errno)}"]
    c = caps.caps
    out = [f"KVM_TDX_CAPABILITIES: {c.nent} entries",
           f"  supported_attrs  {hx(c.supported_attrs, 16)}  "
           + " ".join(catalog.attribute_names(c.supported_attrs)),
           f"  supported_xfam   {hx(c.supported_xfam, 16)}  "
           + " ".join(catalog.xfam_names(c.supported_xfam)),
           f"  user_tdvmcallinfo_1_r11 {hx(c.user_tdvmcallinfo_1_r11, 1)}"]
    for i, e in enumerate(c.entries):
        sub = _row_subleaf(module, i)
        out.append(f"  leaf 0x{e.function:x}" + ("" if sub is None else f".{e.index}"))
        for r, v in zip(REGISTERS, e.regs(), strict=True):
            if not v:
                continue
            kind = "fields" if is_value_register(e.function, sub, r) else "features"
            names = " ".join(catalog.describe(e.function, sub, r, v))
            out.append(f"    {r} {hx(v)}  {kind}: {names}")
    return out


def _asked(module: ModuleProfile, pred: InitVmPrediction, leaf: int, subleaf: int | None,
           register: str) -> int:
    i = module.row_index(leaf, subleaf)
    if i is None or pred.td_params is None:
        return 0
    return pred.td_params.cpuid_values[i][REGISTERS.index(register)]


def changes_text(module: ModuleProfile, pred: InitVmPrediction) -> list[str]:
    """One line per feature change (its bits by name), one per value register (its value
    asked and given, with every reason)."""
    out: list[str] = []
    values: dict[tuple[int, int | None, str], list[str]] = {}
    for c in pred.changes:
        how = f"{CHANGE_WORDS.get(c.kind, c.kind)} ({c.reason})"
        if is_value_register(c.leaf, c.subleaf, c.register):
            values.setdefault((c.leaf, c.subleaf, c.register), []).append(how)
            continue
        names = ", ".join(f"{c.register.upper()}[{b}] "
                          f"{catalog.bit_name(c.leaf, c.subleaf, c.register, b)}"
                          for b in bits_of(c.mask))
        out.append(f"  {_where(c.leaf, c.subleaf)} {names}: {how}")
    for (leaf, sub, register), hows in values.items():
        asked = _asked(module, pred, leaf, sub, register)
        got = (pred.effective or {}).get((leaf, sub), (0, 0, 0, 0))[REGISTERS.index(register)]
        out.append(f"  {_where(leaf, sub)} {register.upper()} {hx(asked)} -> {hx(got)}: "
                   + "; ".join(dict.fromkeys(hows)))
    return out


def _where(leaf: int, subleaf: int | None) -> str:
    return f"0x{leaf:x}" + ("" if subleaf is None else f".{subleaf}")


def init_vm_text(module: ModuleProfile, pred: InitVmPrediction) -> list[str]:
    o = pred.outcome
    out = [f"KVM_TDX_INIT_VM: {o.describe()}"]
    if o.leaf is not None and o.register and o.bit is not None \
            and o.check not in ("gpaw_value", "gpaw_5level"):
        out.append("  bit: " + catalog.bit_name(o.leaf, o.subleaf, o.register, o.bit))
    if pred.status is not None and o.kind is not Kind.ACCEPTED:
        out.append(f"  module: {st.status_name(pred.status)} {hx(pred.status, 16)} from "
                   f"{pred.source}, RCX {hx(pred.rcx, 16)}")
    if pred.warns:
        out.append("  kernel: not an invalid operand, so -EIO and a WARN_ON_ONCE splat "
                   "(\"SEAMCALL TDH_MNG_INIT failed\"; the kernel is tainted)"
                   + (", the VM marked bugged: every later ioctl on it fails"
                      if pred.vm_bugged else ""))
    if pred.effective is not None:
        out.append(f"TD's CPUID (TDH.MNG.RD CPUID_VALUES): {len(pred.effective)} leaves; "
                   + ("requested bits it does not get as asked:" if pred.changes else
                      "every requested bit as asked"))
        out += changes_text(module, pred)
    return out


def render_text(module: ModuleProfile, host: Host, policy: Policy, caps: CapsPrediction,
                pred: InitVmPrediction | None) -> str:
    out = [
        f"module  {module.name}  ({module.source})",
        f"policy  {policy.name}  ({policy.kernels}: {policy.description})",
        f"host    {host.name}",
    ]
    note = kernel_note(module)
    if note:
        out.append(f"note    {note}")
    if policy.allowlist is not None:
        out.append(f"allowlist {policy.allowlist.name}: {policy.allowlist.provenance}")
    out += ["", *caps_text(module, caps)]
    if pred is not None:
        out += ["", *init_vm_text(module, pred)]
    return "\n".join(out) + "\n"

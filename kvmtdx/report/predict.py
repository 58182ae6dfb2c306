"""Rendering of `kvmtdx predict`: the mirror's capabilities and, with a request, INIT_VM."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, cast

from kvmtdx.mirror import CapsPrediction, is_value_register
from kvmtdx.outcome import Outcome, errno_name
from kvmtdx.policy import Policy
from kvmtdx.profiles import Host, ModuleProfile
from kvmtdx.report import hx, to_json
from kvmtdx.structs import REGISTERS, Capabilities, CpuidEntry

BitNamer = Callable[[int, "int | None", str, int], str]


def _fallback_bit_name(leaf: int, subleaf: int | None, register: str, bit: int) -> str:
    return f"bit{bit}"


def bit_namer() -> BitNamer:
    """kvmtdx.catalog.bit_name when the catalog is installed, else "bitN".

    Looked up at run time so this renderer works before (and without) the catalog.
    """
    try:
        catalog = importlib.import_module("kvmtdx.catalog")
    except ImportError:
        return _fallback_bit_name
    fn = getattr(catalog, "bit_name", None)
    return cast(BitNamer, fn) if callable(fn) else _fallback_bit_name


def entry_to_json(e: CpuidEntry) -> dict[str, int]:
    return {"function": e.function, "index": e.index, "flags": e.flags,
            "eax": e.eax, "ebx": e.ebx, "ecx": e.ecx, "edx": e.edx}


def capabilities_to_json(caps: Capabilities) -> dict[str, Any]:
    return {
        "supported_attrs": caps.supported_attrs,
        "supported_xfam": caps.supported_xfam,
        "kernel_tdvmcallinfo_1_r11": caps.kernel_tdvmcallinfo_1_r11,
        "user_tdvmcallinfo_1_r11": caps.user_tdvmcallinfo_1_r11,
        "kernel_tdvmcallinfo_1_r12": caps.kernel_tdvmcallinfo_1_r12,
        "user_tdvmcallinfo_1_r12": caps.user_tdvmcallinfo_1_r12,
        "cpuid": [entry_to_json(e) for e in caps.entries],
    }


def allowlist_json(policy: Policy) -> dict[str, str] | None:
    a = policy.allowlist
    return None if a is None else {"name": a.name, "provenance": a.provenance}


def render_json(module: ModuleProfile, host: Host, policy: Policy, caps: CapsPrediction,
                outcome: Outcome | None) -> str:
    doc: dict[str, Any] = {
        "module": module.name,
        "policy": policy.name,
        "allowlist": allowlist_json(policy),
        "host": host.name,
        "capabilities": capabilities_to_json(caps.caps) if caps.caps else None,
    }
    if caps.errno:
        doc["capabilities_errno"] = errno_name(caps.errno)
    if outcome is not None:
        doc["init_vm"] = outcome.to_json()
    return to_json(doc)


def _bits(mask: int) -> list[int]:
    return [b for b in range(32) if mask >> b & 1]


def _row_subleaf(module: ModuleProfile, i: int) -> int | None:
    return module.rows[i].subleaf if i < len(module.rows) else None


def render_text(module: ModuleProfile, host: Host, policy: Policy, caps: CapsPrediction,
                outcome: Outcome | None) -> str:
    name = bit_namer()
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
        out.append(f"  supported_attrs  {hx(c.supported_attrs, 16)}")
        out.append(f"  supported_xfam   {hx(c.supported_xfam, 16)}  bits "
                   + " ".join(str(b) for b in range(64) if c.supported_xfam >> b & 1))
        out.append(f"  user_tdvmcallinfo_1_r11 {hx(c.user_tdvmcallinfo_1_r11, 1)}")
        for i, e in enumerate(c.entries):
            sub = _row_subleaf(module, i)
            label = f"0x{e.function:x}" + ("" if sub is None else f".{e.index}")
            out.append(f"  leaf {label}")
            for r, v in zip(REGISTERS, e.regs(), strict=True):
                if not v:
                    continue
                if is_value_register(e.function, sub, r):
                    out.append(f"    {r} {hx(v)}  (value field)")
                else:
                    names = " ".join(name(e.function, sub, r, b) for b in _bits(v))
                    out.append(f"    {r} {hx(v)}  {names}")
    if outcome is not None:
        out.append("")
        out.append(f"KVM_TDX_INIT_VM: {outcome.describe()}")
        if outcome.leaf is not None and outcome.register and outcome.bit is not None \
                and outcome.check not in ("gpaw_value", "gpaw_5level"):
            out.append("  bit: " + name(outcome.leaf, outcome.subleaf, outcome.register,
                                        outcome.bit))
    return "\n".join(out) + "\n"

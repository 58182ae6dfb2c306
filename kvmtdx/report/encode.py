"""JSON for the domain values more than one report carries.

Domain types (Outcome, BitRef, Capabilities, Policy) know nothing of JSON; each
is written here, once, so every report spells it the same way (leaves as hex
strings where a bit is named, integers where predict's capabilities are, 64-bit
words always as "0x" + 16 hex digits: jsonfile.hex64).
"""

from __future__ import annotations

from typing import Any

from kvmtdx.identity import HostIdentity
from kvmtdx.jsonfile import hex64
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.policy import Policy
from kvmtdx.outcome import Outcome
from kvmtdx.structs import Capabilities, CpuidEntry


def outcome_json(o: Outcome) -> dict[str, Any]:
    """One INIT_VM outcome with the reason a prediction gives (predict, init-vm)."""
    return {
        "outcome": o.kind.value,
        "errno": o.errno_name,
        "hw_error": hex64(o.hw_error),
        "check": o.check,
        "leaf": o.leaf,
        "subleaf": o.subleaf,
        "register": o.register,
        "bit": o.bit,
    }


def bitref_json(b: BitRef) -> dict[str, Any]:
    return {"leaf": f"0x{b.leaf:x}", "subleaf": b.subleaf, "register": b.register,
            "bit": b.bit, "name": b.name}


def entry_json(e: CpuidEntry) -> dict[str, int]:
    return {"function": e.function, "index": e.index, "flags": e.flags,
            "eax": e.eax, "ebx": e.ebx, "ecx": e.ecx, "edx": e.edx}


def capabilities_json(caps: Capabilities) -> dict[str, Any]:
    """KVM_TDX_CAPABILITIES with the uapi's field names (caps, predict, probe): the 64-bit
    words as hex strings, the 32-bit CPUID words as integers."""
    return {
        "supported_attrs": hex64(caps.supported_attrs),
        "supported_xfam": hex64(caps.supported_xfam),
        "kernel_tdvmcallinfo_1_r11": hex64(caps.kernel_tdvmcallinfo_1_r11),
        "user_tdvmcallinfo_1_r11": hex64(caps.user_tdvmcallinfo_1_r11),
        "kernel_tdvmcallinfo_1_r12": hex64(caps.kernel_tdvmcallinfo_1_r12),
        "user_tdvmcallinfo_1_r12": hex64(caps.user_tdvmcallinfo_1_r12),
        "cpuid": [entry_json(e) for e in caps.entries],
    }


def allowlist_ref_json(policy: Policy) -> dict[str, str] | None:
    """Which allowlist a policy judged by: its name and provenance (None without one)."""
    a = policy.allowlist
    return None if a is None else {"name": a.name, "provenance": a.provenance}


def host_identity_json(h: HostIdentity) -> dict[str, Any]:
    """The "host_identity" every report of a run carries (kvmtdx.identity): which machine,
    kernel, CPU, TDX module and policy it ran on, so merged reports can be told apart."""
    sim = h.simulated
    return {
        "hostname": h.hostname,
        "kernel_release": h.kernel_release,
        "cpu": {"vendor": h.cpu.vendor, "model_name": h.cpu.model_name,
                "family": h.cpu.family, "model": h.cpu.model, "stepping": h.cpu.stepping,
                "fms": h.cpu.fms},
        "tdx_module": {"version": h.tdx_module, "source": h.tdx_module_source},
        "policy": {"name": h.policy, "source": h.policy_source},
        "backend": h.backend,
        "simulated": None if sim is None else {"module": sim.module, "policy": sim.policy,
                                               "mutant": sim.mutant, "host": sim.host},
    }

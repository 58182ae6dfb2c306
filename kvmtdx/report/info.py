"""Rendering of `kvmtdx info`: the KVM/TDX environment as text or JSON."""

from __future__ import annotations

from typing import Any

from kvmtdx import uapi
from kvmtdx.hostinfo import Info
from kvmtdx.identity import HostIdentity
from kvmtdx.report.encode import host_identity_json
from kvmtdx.report.schema import ReportKind, document


def info_to_json(info: Info) -> dict[str, Any]:
    return {
        "backend": info.backend,
        "simulated": info.simulated,
        "kvm_path": info.kvm_path,
        "kvm_api_version": info.kvm_api_version,
        "vm_types": list(info.vm_types),
        "vm_type_names": [uapi.vm_type_name(t) for t in info.vm_types],
        "tdx_available": info.tdx_available,
        "reason": info.reason,
        "kernel_release": info.kernel_release,
        "cpu_model": info.cpu_model,
        "native_cpuid": {
            "path": info.native_cpuid.path,
            "present": info.native_cpuid.present,
            "readable": info.native_cpuid.readable,
            "hint": info.native_cpuid.hint,
        },
    }


def render_json(info: Info, identity: HostIdentity) -> str:
    return document(ReportKind.INFO, info_to_json(info), host_identity_json(identity))


def render_text(info: Info) -> str:
    version = "cannot be asked" if info.kvm_api_version is None else str(info.kvm_api_version)
    types = ", ".join(f"{uapi.vm_type_name(t)} ({t})" for t in info.vm_types)
    n = info.native_cpuid
    native = f"{n.path} ({'readable' if n.readable else 'present, not readable'})" \
        if n.present else f"{n.path} absent"
    rows = [
        ("backend", info.backend),
        ("KVM", f"{info.kvm_path}, API version {version}"),
        ("VM types", types or "unknown"),
        ("TDX", ("usable: " if info.tdx_available else "not usable: ") + info.reason),
        ("kernel", info.kernel_release),
        ("CPU", info.cpu_model),
        ("native CPUID", f"{native}; {n.hint}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "".join(f"{k:<{width}}  {v}\n" for k, v in rows)

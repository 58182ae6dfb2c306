"""Hosts as files: the bundled ones (kvmtdx/data/tdx-hosts/), a user's `--host FILE`, and
writing a host back out.

Two layouts are read.  The bundled one (schema 1) lists each leaf as
`{"leaf", "subleaf", "regs": [eax, ebx, ecx, edx]}` with the host's MSR facts
(`tsx_ctrl`, `ept_5level`, `tdx_io`).  The older user layout writes the registers
as `eax`..`edx` (or `function`/`index` for leaf/sub-leaf) and may give
`xfam_supported`, the XCR0 | XSS the host's KVM supports; without it that comes
from CPUID 0xD.  A leaf a file does not list reads as zeros.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from kvmtdx.errors import DataError
from kvmtdx.model.tdx_host import Host
from kvmtdx.model.tdx_module_tables import Regs
from kvmtdx.model.values import load_json, parse_int
from kvmtdx.structs import NO_SUBLEAF, REGISTERS

BUNDLED_HOSTS: tuple[str, ...] = ("max",)


def _subleaf(value: Any, where: str) -> int | None:
    if value is None or value == "none":
        return None
    n = parse_int(value, where, 32)
    return None if n == NO_SUBLEAF else n


def _regs(e: dict[str, Any], where: str) -> Regs:
    if "regs" in e:
        regs = e["regs"]
        if not isinstance(regs, list) or len(regs) != 4:
            raise DataError(f"{where}.regs: expected [eax, ebx, ecx, edx]")
        values = [parse_int(v, f"{where}.regs[{i}]", 32) for i, v in enumerate(regs)]
    else:
        values = [parse_int(e.get(r, 0), f"{where}.{r}", 32) for r in REGISTERS]
    return (values[0], values[1], values[2], values[3])


def _native(data: dict[str, Any], origin: str) -> dict[tuple[int, int | None], Regs]:
    cpuid = data.get("cpuid", [])
    if not isinstance(cpuid, list):
        raise DataError(f"{origin}: field 'cpuid' must be a list")
    native: dict[tuple[int, int | None], Regs] = {}
    for i, e in enumerate(cpuid):
        w = f"{origin}: cpuid[{i}]"
        if not isinstance(e, dict):
            raise DataError(f"{w}: must be an object")
        leaf = parse_int(e.get("leaf", e.get("function")), f"{w}.leaf", 32)
        native[(leaf, _subleaf(e.get("subleaf", e.get("index")), f"{w}.subleaf"))] = \
            _regs(e, w)
    return native


def host_from_json(data: Any, origin: str) -> Host:
    """A host from either file layout; every error is one line naming `origin`."""
    if not isinstance(data, dict):
        raise DataError(f"{origin}: a host must be a JSON object")
    for key in ("ept_5level", "tsx_ctrl", "tdx_io"):
        if not isinstance(data.get(key, False), bool):
            raise DataError(f"{origin}: field '{key}' must be true or false")
    xfam = data.get("xfam_supported")
    return Host(
        name=str(data.get("name", origin)),
        native=_native(data, origin),
        tsx_ctrl=bool(data.get("tsx_ctrl", False)),
        ept_5level=bool(data.get("ept_5level", False)),
        tdx_io=bool(data.get("tdx_io", False)),
        about=str(data.get("about", "")),
        kvm_xfam=None if xfam is None else parse_int(xfam, f"{origin}: xfam_supported"),
    )


def host_to_json(h: Host) -> dict[str, Any]:
    """The bundled layout (schema 1), which host_from_json reads back."""
    keys = sorted(h.native, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    out: dict[str, Any] = {"schema": 1, "name": h.name}
    if h.about:
        out["about"] = h.about
    out.update({"tsx_ctrl": h.tsx_ctrl, "ept_5level": h.ept_5level, "tdx_io": h.tdx_io})
    if h.kvm_xfam is not None:
        out["xfam_supported"] = f"0x{h.kvm_xfam:x}"
    out["cpuid"] = [{"leaf": f"0x{k[0]:x}", "subleaf": k[1],
                     "regs": [f"0x{v:08x}" for v in h.native[k]]} for k in keys]
    return out


@functools.cache
def bundled_host(name: str) -> Host:
    """A bundled host (kvmtdx/data/tdx-hosts/<name>.json)."""
    if name not in BUNDLED_HOSTS:
        raise DataError(f"unknown bundled TDX host {name!r}: use one of "
                        f"{', '.join(BUNDLED_HOSTS)} or a host JSON file")
    path = resources.files("kvmtdx").joinpath("data").joinpath("tdx-hosts").joinpath(
        f"{name}.json")
    return host_from_json(json.loads(path.read_text()), f"bundled host {name}")


def load_host(name_or_file: str = "max") -> Host:
    """A bundled host by name, or a host JSON file."""
    if name_or_file in BUNDLED_HOSTS:
        return bundled_host(name_or_file)
    return host_from_json(load_json(name_or_file), name_or_file)


# The host every command assumes unless told otherwise: a constructed Sapphire Rapids
# part with every feature any bundled module allows and valid values wherever the
# module reads values (kvmtdx/data/tdx-hosts/max.json says how it was built).
MAX_HOST = bundled_host("max")

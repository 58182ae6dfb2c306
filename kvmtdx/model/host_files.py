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

from kvmtdx import jsonfile
from kvmtdx.errors import DataError
from kvmtdx.jsonfile import flag, hex64, objects, parse_int, sub, text
from kvmtdx.model.tdx_host import Host
from kvmtdx.model.values import Regs, parse_regs
from kvmtdx.structs import NO_SUBLEAF, REGISTERS

BUNDLED_HOSTS: tuple[str, ...] = ("max",)
_HOST_FIELDS = ("name", "cpuid", "xfam_supported", "ept_5level", "tsx_ctrl", "tdx_io")
_ENTRY_FIELDS = ("leaf", "function", "subleaf", "index", "regs", *REGISTERS)


def _subleaf(value: Any, where: str) -> int | None:
    if value is None or value == "none":
        return None
    n = parse_int(value, where, 32)
    return None if n == NO_SUBLEAF else n


def _regs(e: dict[str, Any], where: str) -> Regs:
    if "regs" in e:
        if any(r in e for r in REGISTERS):
            raise DataError(f"{where}: give either 'regs' or eax..edx, not both")
        return parse_regs(e["regs"], sub(where, "regs"))
    a, b, c, d = (parse_int(e.get(r, 0), sub(where, r), 32) for r in REGISTERS)
    return (a, b, c, d)


def _native(value: Any, where: str) -> dict[tuple[int, int | None], Regs]:
    native: dict[tuple[int, int | None], Regs] = {}
    for w, e in objects(value, where):
        jsonfile.check_fields(e, w, _ENTRY_FIELDS)
        leaf = parse_int(e.get("leaf", e.get("function")), sub(w, "leaf"), 32)
        native[(leaf, _subleaf(e.get("subleaf", e.get("index")), sub(w, "subleaf")))] = \
            _regs(e, w)
    return native


def host_from_json(data: Any, origin: str) -> Host:
    """A host from either file layout; every error is one line naming `origin`."""
    jsonfile.document(data, origin, "a host", _HOST_FIELDS)
    xfam = data.get("xfam_supported")
    return Host(
        name=text(data, "name", origin, origin),
        native=_native(data.get("cpuid", []), sub(origin, "cpuid")),
        tsx_ctrl=flag(data, "tsx_ctrl", origin),
        ept_5level=flag(data, "ept_5level", origin),
        tdx_io=flag(data, "tdx_io", origin),
        about=text(data, "about", origin, ""),
        kvm_xfam=None if xfam is None else parse_int(xfam, sub(origin, "xfam_supported")),
    )


def host_to_json(h: Host) -> dict[str, Any]:
    """The bundled layout (schema 1), which host_from_json reads back."""
    keys = sorted(h.native, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    out: dict[str, Any] = {"schema": 1, "name": h.name}
    if h.about:
        out["about"] = h.about
    out.update({"tsx_ctrl": h.tsx_ctrl, "ept_5level": h.ept_5level, "tdx_io": h.tdx_io})
    if h.kvm_xfam is not None:
        out["xfam_supported"] = hex64(h.kvm_xfam)
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
    return host_from_json(jsonfile.load(name_or_file), name_or_file)


# The host every command assumes unless told otherwise: a constructed Sapphire Rapids
# part with every feature any bundled module allows and valid values wherever the
# module reads values (kvmtdx/data/tdx-hosts/max.json says how it was built).
MAX_HOST = bundled_host("max")

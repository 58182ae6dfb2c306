"""KVM_TDX_INIT_VM requests as JSON files: the format `predict --request` and `init-vm` read.

A request is raw on purpose: it can carry non-zero reserved words, padding,
a lying `nent`, a non-zero cmd.flags or hw_error, because those are exactly
the inputs a kernel must refuse.  Integers may be JSON numbers or strings
("0x1f").  Any malformed field raises DataError naming the file and field.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kvmtdx import jsonfile
from kvmtdx.errors import DataError
from kvmtdx.jsonfile import hex64, parse_int
from kvmtdx.structs import REGISTERS, CpuidEntry, InitVm


@dataclass(frozen=True)
class Request:
    """One INIT_VM attempt: the struct plus the kvm_tdx_cmd words the caller controls.

    `before` replays a TD's history: INIT_VM calls sent to the same TD first, in order
    (a lifecycle finding's replay); empty, the request goes to a fresh TD.
    """

    init_vm: InitVm
    flags: int = 0  # kvm_tdx_cmd.flags
    hw_error: int = 0  # kvm_tdx_cmd.hw_error as sent
    before: tuple[Request, ...] = ()

    @property
    def calls(self) -> tuple[Request, ...]:
        """Every INIT_VM the replay sends to its TD, in order, this one last (without its
        history)."""
        return (*self.before, replace(self, before=()))


_WORD_FIELDS: tuple[tuple[str, int], ...] = (
    ("mrconfigid", 6), ("mrowner", 6), ("mrownerconfig", 6), ("reserved", 12),
)
_TOP_KEYS = frozenset(
    {"attributes", "xfam", "cpuid", "flags", "hw_error", "padding", "nent", "before"}
    | {name for name, _ in _WORD_FIELDS}
)
# Free-text keys people put in hand-written files; ignored rather than refused.
_NOTE_KEYS = frozenset({"name", "why", *jsonfile.NOTE_KEYS})
# The kind `verify --save-failures` writes on its requests; a request written by hand has none.
REQUEST_KIND = "request"
_ENTRY_KEYS = frozenset({"function", "index", "flags", "padding", *REGISTERS})


def _words(value: Any, n: int, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != n:
        raise DataError(f"{where}: expected a list of {n} integers")
    return tuple(parse_int(v, f"{where}[{i}]", 64) for i, v in enumerate(value))


def _entry(value: Any, where: str) -> CpuidEntry:
    if not isinstance(value, dict):
        raise DataError(f"{where}: must be an object")
    for key in value:
        if key not in _ENTRY_KEYS:
            raise DataError(f"{where}.{key}: unknown field (expected one of "
                            f"{', '.join(sorted(_ENTRY_KEYS))})")
    if "function" not in value:
        raise DataError(f"{where}.function: missing")
    pad = value.get("padding", [0, 0, 0])
    if not isinstance(pad, list) or len(pad) != 3:
        raise DataError(f"{where}.padding: expected a list of 3 integers")
    p0, p1, p2 = (parse_int(v, f"{where}.padding[{i}]", 32) for i, v in enumerate(pad))
    return CpuidEntry(
        function=parse_int(value["function"], f"{where}.function", 32),
        index=parse_int(value.get("index", 0), f"{where}.index", 32),
        flags=parse_int(value.get("flags", 0), f"{where}.flags", 32),
        eax=parse_int(value.get("eax", 0), f"{where}.eax", 32),
        ebx=parse_int(value.get("ebx", 0), f"{where}.ebx", 32),
        ecx=parse_int(value.get("ecx", 0), f"{where}.ecx", 32),
        edx=parse_int(value.get("edx", 0), f"{where}.edx", 32),
        padding=(p0, p1, p2),
    )


def request_from_json(data: Any, origin: str) -> Request:
    """A Request from parsed JSON; `origin` (a file name) prefixes every error."""
    jsonfile.document(data, origin, "a request", _TOP_KEYS, kind=REQUEST_KIND, notes=_NOTE_KEYS)
    before = data.get("before", [])
    if not isinstance(before, list):
        raise DataError(f"{origin}: before: expected a list of requests (sent to the same TD "
                        "first)")
    earlier = []
    for i, item in enumerate(before):
        where = f"{origin}: before[{i}]"
        if isinstance(item, dict) and "before" in item:
            raise DataError(f"{where}.before: an earlier call has no history of its own")
        jsonfile.document(item, where, "a request", _TOP_KEYS, kind=REQUEST_KIND,
                          notes=_NOTE_KEYS)
        earlier.append(_one_request(item, where))
    return replace(_one_request(data, origin), before=tuple(earlier))


def _one_request(data: dict[str, Any], origin: str) -> Request:
    for key in ("attributes", "xfam", "cpuid"):
        if key not in data:
            raise DataError(f"{origin}: {key}: missing")
    cpuid = data["cpuid"]
    if not isinstance(cpuid, list):
        raise DataError(f"{origin}: cpuid: expected a list of entries")
    entries = tuple(_entry(e, f"{origin}: cpuid[{i}]") for i, e in enumerate(cpuid))
    words: dict[str, tuple[int, ...]] = {}
    for name, n in _WORD_FIELDS:
        if name in data:
            words[name] = _words(data[name], n, f"{origin}: {name}")
    nent = data.get("nent")
    init_vm = InitVm(
        attributes=parse_int(data["attributes"], f"{origin}: attributes", 64),
        xfam=parse_int(data["xfam"], f"{origin}: xfam", 64),
        nent=None if nent is None else parse_int(nent, f"{origin}: nent", 32),
        cpuid_padding=parse_int(data.get("padding", 0), f"{origin}: padding", 32),
        entries=entries,
        **words,
    )
    return Request(
        init_vm=init_vm,
        flags=parse_int(data.get("flags", 0), f"{origin}: flags", 32),
        hw_error=parse_int(data.get("hw_error", 0), f"{origin}: hw_error", 64),
    )


def load_request(path: str) -> Request:
    return request_from_json(jsonfile.load(path), path)


def _hx(value: int) -> str:
    return f"0x{value:x}"


def entry_to_json(e: CpuidEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "function": _hx(e.function), "index": _hx(e.index), "flags": _hx(e.flags),
        **{r: f"0x{v:08x}" for r, v in zip(REGISTERS, e.regs(), strict=True)},
    }
    if any(e.padding):
        out["padding"] = [_hx(p) for p in e.padding]
    return out


def request_to_json(req: Request) -> dict[str, Any]:
    """The JSON form request_from_json reads back; fields at their default are left out."""
    iv = req.init_vm
    out: dict[str, Any] = {"attributes": hex64(iv.attributes), "xfam": hex64(iv.xfam)}
    if req.flags:
        out["flags"] = _hx(req.flags)
    if req.hw_error:
        out["hw_error"] = hex64(req.hw_error)
    for name, _ in _WORD_FIELDS:
        words: tuple[int, ...] = getattr(iv, name)
        if any(words):
            out[name] = [hex64(w) for w in words]
    if iv.cpuid_padding:
        out["padding"] = _hx(iv.cpuid_padding)
    if iv.nent is not None:
        out["nent"] = iv.nent
    out["cpuid"] = [entry_to_json(e) for e in iv.entries]
    if req.before:
        out["before"] = [request_to_json(r) for r in req.before]
    return out

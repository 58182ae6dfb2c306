"""Reading saved findings back (`kvmtdx fuzz --replay FILE`): request files, as `kvmtdx
init-vm --request` reads them (their "before" calls first, on the same TD), and fuzz-case
files (calls that include KVM_TDX_CAPABILITIES or end with the vCPU path), as `kvmtdx fuzz
--save DIR` writes them."""

from __future__ import annotations

from typing import Any

from kvmtdx import jsonfile
from kvmtdx.errors import DataError
from kvmtdx.fuzz.scenario import HEADER_WORDS, CapsCall, Lie, Scenario, Step, VcpuCall
from kvmtdx.jsonfile import parse_int
from kvmtdx.model.requests import request_from_json
from kvmtdx.structs import KVM_MAX_CPUID_ENTRIES, REGISTERS

FUZZ_CASE_KIND = "fuzz-case"
_CAPS_KEYS = ("nent", "flags", "hw_error", "header", "fill")
_VCPU_KEYS = ("split_irqchip", "nent", "fill", "set_cpuid2", "lie")
_LIE_KEYS = ("leaf", "subleaf", "register", "bit", "set")


def _room(value: Any, where: str) -> int:
    """A caller's buffer's room in entries: KVM takes at most KVM_MAX_CPUID_ENTRIES."""
    nent = parse_int(value, where, 32)
    if nent > KVM_MAX_CPUID_ENTRIES:
        raise DataError(f"{where}: {nent}: room for at most {KVM_MAX_CPUID_ENTRIES} entries")
    return nent


def caps_call_from_json(value: Any, where: str) -> CapsCall:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected an object (a KVM_TDX_CAPABILITIES call)")
    jsonfile.check_fields(value, where, _CAPS_KEYS)
    if "nent" not in value:
        raise DataError(f"{where}.nent: missing")
    header = value.get("header", [0] * len(HEADER_WORDS))
    if not isinstance(header, list) or len(header) != len(HEADER_WORDS):
        raise DataError(f"{where}.header: expected a list of {len(HEADER_WORDS)} integers "
                        f"({', '.join(HEADER_WORDS)})")
    return CapsCall(_room(value["nent"], f"{where}.nent"),
                    parse_int(value.get("flags", 0), f"{where}.flags", 32),
                    parse_int(value.get("hw_error", 0), f"{where}.hw_error", 64),
                    tuple(parse_int(w, f"{where}.header[{i}]", 64) for i, w in enumerate(header)),
                    parse_int(value.get("fill", 0), f"{where}.fill", 8))


def lie_from_json(value: Any, where: str) -> Lie | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected null or an object (one bit told otherwise)")
    jsonfile.check_fields(value, where, _LIE_KEYS)
    missing = [k for k in _LIE_KEYS if k not in value]
    if missing:
        raise DataError(f"{where}.{missing[0]}: missing")
    register = value["register"]
    if register not in REGISTERS:
        raise DataError(f"{where}.register: {register!r}: expected one of "
                        f"{', '.join(REGISTERS)}")
    sub = value["subleaf"]
    return Lie(parse_int(value["leaf"], f"{where}.leaf", 32),
               None if sub is None else parse_int(sub, f"{where}.subleaf", 32), register,
               _bit(value["bit"], f"{where}.bit"), jsonfile.flag(value, "set", where))


def _bit(value: Any, where: str) -> int:
    bit = parse_int(value, where, 32)
    if bit > 31:
        raise DataError(f"{where}: {bit}: a register has bits 0 to 31")
    return bit


def vcpu_call_from_json(value: Any, where: str) -> VcpuCall:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected an object (the vCPU path)")
    jsonfile.check_fields(value, where, _VCPU_KEYS)
    plain = VcpuCall()
    return VcpuCall(jsonfile.flag(value, "split_irqchip", where, True),
                    _room(value.get("nent", plain.nent), f"{where}.nent"),
                    parse_int(value.get("fill", 0), f"{where}.fill", 8),
                    jsonfile.flag(value, "set_cpuid2", where),
                    lie_from_json(value.get("lie"), f"{where}.lie"))


def _call(value: Any, where: str) -> tuple[Step, ...]:
    if not isinstance(value, dict) or len(value) != 1 or \
            next(iter(value)) not in ("init_vm", "capabilities", "vcpu"):
        raise DataError(f"{where}: expected {{\"init_vm\": REQUEST}}, "
                        "{\"capabilities\": CALL} or {\"vcpu\": CALL}")
    key, body = next(iter(value.items()))
    if key == "capabilities":
        return (caps_call_from_json(body, f"{where}.capabilities"),)
    if key == "vcpu":
        return (vcpu_call_from_json(body, f"{where}.vcpu"),)
    return request_from_json(body, f"{where}.init_vm").calls


def case_from_json(doc: Any, origin: str) -> Scenario:
    """The calls a saved finding sends to one TD, from a request or a fuzz-case document."""
    if isinstance(doc, dict) and doc.get("kind") == FUZZ_CASE_KIND:
        jsonfile.document(doc, origin, "a fuzz case", ("calls",), kind=FUZZ_CASE_KIND)
        calls = doc.get("calls")
        if not isinstance(calls, list) or not calls:
            raise DataError(f"{origin}: calls: expected a non-empty list of calls")
        steps = tuple(s for i, c in enumerate(calls) for s in _call(c, f"{origin}: calls[{i}]"))
        if any(isinstance(s, VcpuCall) for s in steps[:-1]):
            raise DataError(f"{origin}: calls: the vCPU path must be the last call")
        return steps
    return request_from_json(doc, origin).calls


def load_case(path: str) -> Scenario:
    return case_from_json(jsonfile.load(path), path)

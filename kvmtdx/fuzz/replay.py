"""Reading saved findings back (`kvmtdx fuzz --replay FILE`): request files, as `kvmtdx
init-vm --request` reads them (their "before" calls first, on the same TD), and fuzz-case
files (calls that include KVM_TDX_CAPABILITIES), as `kvmtdx fuzz --save DIR` writes them."""

from __future__ import annotations

from typing import Any

from kvmtdx import jsonfile
from kvmtdx.errors import DataError
from kvmtdx.fuzz.scenario import HEADER_WORDS, CapsCall, Scenario, Step
from kvmtdx.jsonfile import parse_int
from kvmtdx.model.requests import request_from_json

FUZZ_CASE_KIND = "fuzz-case"
_CAPS_KEYS = ("nent", "flags", "hw_error", "header", "fill")


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
    nent = parse_int(value["nent"], f"{where}.nent", 32)
    if nent > 256:
        raise DataError(f"{where}.nent: {nent}: room for at most 256 entries")
    return CapsCall(nent, parse_int(value.get("flags", 0), f"{where}.flags", 32),
                    parse_int(value.get("hw_error", 0), f"{where}.hw_error", 64),
                    tuple(parse_int(w, f"{where}.header[{i}]", 64) for i, w in enumerate(header)),
                    parse_int(value.get("fill", 0), f"{where}.fill", 8))


def _call(value: Any, where: str) -> tuple[Step, ...]:
    if not isinstance(value, dict) or len(value) != 1 or \
            next(iter(value)) not in ("init_vm", "capabilities"):
        raise DataError(f"{where}: expected {{\"init_vm\": REQUEST}} or "
                        "{\"capabilities\": CALL}")
    key, body = next(iter(value.items()))
    if key == "capabilities":
        return (caps_call_from_json(body, f"{where}.capabilities"),)
    return request_from_json(body, f"{where}.init_vm").calls


def case_from_json(doc: Any, origin: str) -> Scenario:
    """The calls a saved finding sends to one TD, from a request or a fuzz-case document."""
    if isinstance(doc, dict) and doc.get("kind") == FUZZ_CASE_KIND:
        jsonfile.document(doc, origin, "a fuzz case", ("calls",), kind=FUZZ_CASE_KIND)
        calls = doc.get("calls")
        if not isinstance(calls, list) or not calls:
            raise DataError(f"{origin}: calls: expected a non-empty list of calls")
        return tuple(s for i, c in enumerate(calls) for s in _call(c, f"{origin}: calls[{i}]"))
    return request_from_json(doc, origin).calls


def load_case(path: str) -> Scenario:
    return case_from_json(jsonfile.load(path), path)

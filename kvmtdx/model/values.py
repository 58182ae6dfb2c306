"""Reading the project's JSON: integers as numbers or strings, register quadruples, files.

Every error is a DataError naming where the bad value is (exit 2, one line).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from kvmtdx.errors import DataError

Regs = tuple[int, int, int, int]
ZERO_REGS: Regs = (0, 0, 0, 0)


def parse_int(value: Any, where: str, bits: int = 64) -> int:
    """An integer written as a JSON number or a string ("0x1f", "31")."""
    if isinstance(value, bool):
        raise DataError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        try:
            n = int(value.strip(), 0)
        except ValueError:
            raise DataError(f"{where}: not an integer: {value!r}") from None
    else:
        raise DataError(f"{where}: expected an integer, got {type(value).__name__}")
    if n < 0 or n >> bits:
        raise DataError(f"{where}: {value!r} does not fit in {bits} bits")
    return n


def parse_regs(value: Any, where: str) -> Regs:
    if not isinstance(value, list) or len(value) != 4:
        raise DataError(f"{where}: expected a list of 4 registers [eax, ebx, ecx, edx]")
    a, b, c, d = (parse_int(v, f"{where}[{i}]", 32) for i, v in enumerate(value))
    return (a, b, c, d)


def load_json(path: str | Path) -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{p}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None


def bundled_json(name: str) -> Any:
    return json.loads(resources.files("kvmtdx").joinpath("data").joinpath(name).read_text())

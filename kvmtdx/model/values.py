"""Values the model's data files share: register quadruples and the bundled data folder.

Reading a user's file (limits, strict JSON, strict integers, unknown fields) is
kvmtdx.jsonfile's job; bundled data is the package's own and trusted.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from kvmtdx.errors import DataError
from kvmtdx.jsonfile import parse_int

Regs = tuple[int, int, int, int]
ZERO_REGS: Regs = (0, 0, 0, 0)


def parse_regs(value: Any, where: str) -> Regs:
    if not isinstance(value, list) or len(value) != 4:
        raise DataError(f"{where}: expected a list of 4 registers [eax, ebx, ecx, edx]")
    a, b, c, d = (parse_int(v, f"{where}[{i}]", 32) for i, v in enumerate(value))
    return (a, b, c, d)


def bundled_json(name: str) -> Any:
    return json.loads(resources.files("kvmtdx").joinpath("data").joinpath(name).read_text())

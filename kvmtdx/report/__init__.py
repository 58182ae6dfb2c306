"""Rendering: what people, KTAP runners, JSON readers and JUnit consumers get.

Each submodule renders one kind of result; this module holds what they share.
"""

from __future__ import annotations

import json
from typing import Any

FORMATS: tuple[str, ...] = ("text", "json", "ktap", "junit")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def hx(value: int, width: int = 8) -> str:
    return f"0x{value:0{width}x}"

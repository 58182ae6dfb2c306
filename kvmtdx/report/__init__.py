"""Rendering: what people, KTAP runners, JSON readers and JUnit consumers get.

Each submodule renders one kind of result; this module holds what they share.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

FORMATS: tuple[str, ...] = ("text", "json", "ktap", "junit")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def emit(text: str, output: str | None) -> None:
    """Print to stdout, or write `output` atomically (rename over a temp file)."""
    if output is None or output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def hx(value: int, width: int = 8) -> str:
    return f"0x{value:0{width}x}"

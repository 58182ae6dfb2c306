"""Where kvmtdx keeps what it can make again (compiled kernel code, fuzz databases): one rule
for every user of a cache, so KVMTDX_CACHE_DIR moves all of them at once."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(part: str) -> Path:
    """`part` in $KVMTDX_CACHE_DIR, else in the XDG cache directory's kvmtdx/ (not made)."""
    env = os.environ.get("KVMTDX_CACHE_DIR")
    if env:
        return Path(env) / part
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kvmtdx" / part

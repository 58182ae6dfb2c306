"""Running a benchmark's workload on another checkout of kvmtdx, in a child process.

A benchmark compares this tree with an older one (an earlier commit, today's main) in
one run, since the machines are noisy.  The child imports the other tree's kvmtdx
(not the one this interpreter has installed: an editable install's finder would hand
out the installed package's submodules), reads a job as JSON on stdin and prints its
result as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# What every driver starts with: `job` read, the tree's kvmtdx imported, `gc` at hand.
PREAMBLE = r"""
import gc, json, sys, time
from collections import Counter
from pathlib import Path
job = json.load(sys.stdin)
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, job["tree"])
import kvmtdx
if Path(job["tree"]).resolve() not in Path(kvmtdx.__file__).resolve().parents:
    sys.exit(f"{job['tree']}: kvmtdx came from {kvmtdx.__file__}")
"""


def run_in_tree(tree: Path, driver: str, job: dict[str, Any]) -> Any | str:
    """`driver` (after PREAMBLE) in a child on `tree` with `job`: its JSON output, or the
    last line it printed on stderr when it failed."""
    p = subprocess.run([sys.executable, "-c", PREAMBLE + driver],
                       input=json.dumps({"tree": str(tree), **job}), cwd=tree,
                       capture_output=True, text=True, check=False)
    if p.returncode:
        return (p.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(p.stdout)

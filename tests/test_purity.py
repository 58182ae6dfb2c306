"""The model is pure: importing it loads no cffi, no device code, nothing that reads the OS.

Checked in a fresh interpreter, so an import another test made cannot hide
one the model makes itself.  Purity is what lets the mirror run anywhere
(no /dev/kvm, no compiler) and keeps the simulated host's independent
reading of the contract honest.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import kvmtdx.model

MODEL_MODULES = sorted(
    f"kvmtdx.model.{m.name}" for m in pkgutil.iter_modules(kvmtdx.model.__path__)
)
FOUNDATION = ("kvmtdx.structs", "kvmtdx.layout", "kvmtdx.status", "kvmtdx.outcome",
              "kvmtdx.errors", "kvmtdx.verdict", "kvmtdx.jsonfile")
# What a pure module must not bring in, directly or through another import.
IMPURE = ("cffi", "_cffi_backend", "psutil", "kvmtdx.uapi", "kvmtdx.device", "kvmtdx.sim",
          "kvmtdx.native", "kvmtdx.hostinfo", "kvmtdx.session", "ctypes", "subprocess",
          "socket")


def _loaded_after_import(modules: tuple[str, ...] | list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(json.loads(out))


def test_the_model_package_has_the_modules_the_layout_names() -> None:
    assert {"kvmtdx.model.mirror", "kvmtdx.model.policy", "kvmtdx.model.profiles",
            "kvmtdx.model.catalog"} <= set(MODEL_MODULES)


def test_importing_the_model_loads_nothing_impure() -> None:
    loaded = _loaded_after_import([*MODEL_MODULES, *FOUNDATION])
    assert not sorted(m for m in loaded if m in IMPURE or m.startswith("cffi.")), loaded


def test_the_purity_check_sees_an_impure_import() -> None:
    # The witness: the device layer does load cffi, so the check can fail.
    assert "cffi" in _loaded_after_import(["kvmtdx.uapi"])

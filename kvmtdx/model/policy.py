"""Kernel policies and the allowlist, as data.

A policy names how a kernel version (or a proposed series) treats TDX
configurable CPUID: what KVM_TDX_CAPABILITIES writes, and which INIT_VM
requests KVM refuses itself.  The mirror reads these facts to predict, the
simulated host reads them to behave; each interprets them on its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

from kvmtdx import jsonfile
from kvmtdx.errors import DataError
from kvmtdx.jsonfile import objects, parse_int
from kvmtdx.model.profiles import bundled_json
from kvmtdx.model.rules import (
    ANY,
    FULL,
    GPAW_FIELD,
    GPAW_LEAF,
    TSX_WAITPKG_DENYLIST,
    VALUE_REGISTERS,
    Denylist,
    key_matches,
)
from kvmtdx.structs import REGISTERS


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Which directly configurable bits KVM supports, per (leaf, KVM index, register).

    Rows report their "no sub-leaf" index as 0 here, as KVM does.  Registers
    in `passthrough` are never filtered (by default the value registers of
    `rules.VALUE_REGISTERS`); a register with neither an allowed entry nor a
    passthrough is denied whole.
    """

    name: str
    provenance: str
    allowed: dict[tuple[int, int, str], int]
    passthrough: frozenset[tuple[int, int, str]]  # sub-leaf / register may be ANY
    names: dict[tuple[int, int, str, int], str]
    # Bits nobody tried (a probe cut short, or targeted): not allowed here, yet not known to
    # be blocked either.  Kept so that whoever loads the table can see it.
    untried: dict[tuple[int, int, str], int] = field(default_factory=dict)

    def is_passthrough(self, leaf: int, index: int, register: str) -> bool:
        return key_matches(self.passthrough, leaf, index, register)

    def mask(self, leaf: int, index: int, register: str) -> int:
        """The bits KVM allows in this register of this row."""
        if self.is_passthrough(leaf, index, register):
            return FULL
        return self.allowed.get((leaf, index, register), 0)


def _sub(value: Any, where: str) -> int:
    if value == "*":
        return ANY
    if value is None or value == "none":
        return 0
    n = parse_int(value, where, 32)
    return 0 if n == 0xFFFFFFFF else n


_ALLOWLIST_FIELDS = ("name", "provenance", "allowed", "passthrough", "untried")
_ALLOWED_FIELDS = ("leaf", "subleaf", "register", "bits", "mask")
_PASSTHROUGH_FIELDS = ("leaf", "subleaf", "register")
ALLOWLIST_KIND = "allowlist"  # the kind `probe --emit-allowlist` writes


def _register(e: dict[str, Any], w: str, default: str | None = None) -> str:
    reg = e.get("register", default)
    if reg not in REGISTERS and not (default == "*" and reg == "*"):
        either = "'*' or one of " if default == "*" else "one of "
        raise DataError(f"{w}.register: must be {either}{', '.join(REGISTERS)}")
    return str(reg)


def _bits(e: dict[str, Any], w: str, key: tuple[int, int, str],
          names: dict[tuple[int, int, str, int], str]) -> int:
    """The mask an `allowed` entry gives: bits by number (with names) or a mask."""
    bits = e.get("bits")
    mask = 0
    if isinstance(bits, dict):
        for b, nm in bits.items():
            bit = parse_int(b, f"{w}.bits key", 5)
            if not isinstance(nm, str):
                raise DataError(f"{w}.bits.{b}: expected a name (a string), got "
                                f"{jsonfile.type_name(nm)}")
            mask |= 1 << bit
            names[(key[0], key[1], key[2], bit)] = nm
    elif isinstance(bits, list):
        for j, b in enumerate(bits):
            mask |= 1 << parse_int(b, f"{w}.bits[{j}]", 5)
    elif "mask" in e and bits is None:
        mask = parse_int(e["mask"], f"{w}.mask", 32)
    else:
        raise DataError(f"{w}: needs 'bits' (object or list of bit numbers) or 'mask'")
    return mask


def _passthrough(data: dict[str, Any], origin: str) -> frozenset[tuple[int, int, str]]:
    # Without a list of its own, an allowlist passes the value registers kvmtdx knows.
    if "passthrough" not in data:
        return frozenset(VALUE_REGISTERS)
    out: set[tuple[int, int, str]] = set()
    for w, e in objects(data["passthrough"], jsonfile.sub(origin, "passthrough")):
        jsonfile.check_fields(e, w, _PASSTHROUGH_FIELDS)
        out.add((parse_int(e.get("leaf"), f"{w}.leaf", 32), _sub(e.get("subleaf"), f"{w}.subleaf"),
                 _register(e, w, "*")))
    return frozenset(out)


def allowlist_from_json(data: Any, origin: str) -> Allowlist:
    jsonfile.document(data, origin, "an allowlist", _ALLOWLIST_FIELDS, kind=ALLOWLIST_KIND)
    allowed: dict[tuple[int, int, str], int] = {}
    names: dict[tuple[int, int, str, int], str] = {}
    if "allowed" not in data:
        raise DataError(f"{origin}: field 'allowed' must be a list")
    for w, e in objects(data["allowed"], jsonfile.sub(origin, "allowed")):
        jsonfile.check_fields(e, w, _ALLOWED_FIELDS)
        key = (parse_int(e.get("leaf"), f"{w}.leaf", 32), _sub(e.get("subleaf"), f"{w}.subleaf"),
               _register(e, w))
        allowed[key] = allowed.get(key, 0) | _bits(e, w, key, names)
    return Allowlist(
        name=jsonfile.text(data, "name", origin, origin),
        provenance=jsonfile.text(data, "provenance", origin, f"loaded from {origin}"),
        allowed=allowed,
        passthrough=_passthrough(data, origin),
        names=names,
        untried=_untried(data.get("untried", []), origin),
    )


def _untried(value: Any, origin: str) -> dict[tuple[int, int, str], int]:
    if not isinstance(value, list):
        raise DataError(f"{origin}: field 'untried' must be a list")
    out: dict[tuple[int, int, str], int] = {}
    for i, e in enumerate(value):
        w = f"{origin}: untried[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("bits"), (dict, list)):
            raise DataError(f"{w}: must be an object with 'bits'")
        reg = e.get("register")
        if reg not in REGISTERS:
            raise DataError(f"{w}.register: must be one of {', '.join(REGISTERS)}")
        key = (parse_int(e.get("leaf"), f"{w}.leaf", 32), _sub(e.get("subleaf"), f"{w}.subleaf"),
               str(reg))
        for j, b in enumerate(e["bits"]):
            out[key] = out.get(key, 0) | 1 << parse_int(b, f"{w}.bits[{j}]", 5)
    return out


def allowlist_to_json(a: Allowlist) -> dict[str, Any]:
    def sub(s: int) -> Any:
        return "*" if s == ANY else s

    def named(table: dict[tuple[int, int, str], int]) -> list[dict[str, Any]]:
        return [{"leaf": f"0x{leaf:x}", "subleaf": sub(s), "register": r,
                 "bits": {str(b): a.names.get((leaf, s, r, b), f"bit{b}")
                          for b in range(32) if m >> b & 1}}
                for (leaf, s, r), m in sorted(table.items())]

    return {
        "schema": 1,
        "name": a.name,
        "provenance": a.provenance,
        "passthrough": [
            {"leaf": f"0x{leaf:x}", "subleaf": sub(s), "register": r}
            for leaf, s, r in sorted(a.passthrough)
        ],
        "allowed": named(a.allowed),
        "untried": named(a.untried),
    }


# Parsed once per process: every rfc-v2 Policy without a user table shares it.
@functools.cache
def bundled_allowlist() -> Allowlist:
    return allowlist_from_json(bundled_json("allowlist-rfc-v2.json"), "bundled rfc-v2 allowlist")


def load_allowlist(path: str) -> Allowlist:
    return allowlist_from_json(jsonfile.load(path), path)


@dataclass(frozen=True, slots=True)
class Policy:
    """How one kernel treats TDX configurable CPUID (spec sections 3, 4 and 6), as data.

    Checks and the mirror ask a policy what it has (a denylist, an allowlist)
    rather than what it is called, so a user's allowlist or a new kernel's
    policy is a new value here, not new code elsewhere.
    """

    name: str
    kernels: str
    description: str
    # Linux 6.16 copies the caller's whole capabilities header in and echoes
    # every field it does not set; later kernels read only cpuid.nent.
    caps_echoes_caller: bool
    # Linux 6.16 writes struct kvm_tdx_cmd back after KVM_TDX_CAPABILITIES.
    caps_writes_cmd_back: bool
    user_tdvmcallinfo_1_r11: int
    # Upstream's HLE/RTM/WAITPKG denylist, or the series' allowlist (or, in
    # principle, both): what KVM hides and refuses beyond the module's own rules.
    denylist: Denylist | None
    allowlist: Allowlist | None
    # A TDH.MNG.INIT status other than an invalid operand: Linux 6.19 on reports it
    # with TDX_BUG_ON_1, which marks the VM bugged (every later VM ioctl -EIO);
    # Linux 6.16 only warned, and the TD could take another INIT_VM.
    module_error_kills_vm: bool = True

    @property
    def allowlist_name(self) -> str | None:
        return self.allowlist.name if self.allowlist else None

    def hides(self, leaf: int, index: int, register: str) -> int:
        """Bits of a row's register this kernel never reports, whatever the module lists."""
        hidden = 0
        if self.allowlist is not None:
            hidden |= ~self.allowlist.mask(leaf, index, register) & FULL
        if self.denylist is not None:
            hidden |= self.denylist.mask(leaf, index, register)
        if leaf == GPAW_LEAF and register == "eax":
            hidden &= ~GPAW_FIELD  # GPAW has its own rule: reported as 0xff
        return hidden

    def with_allowlist(self, allowlist: Allowlist) -> Policy:
        return replace(self, allowlist=allowlist)


POLICIES: tuple[Policy, ...] = (
    Policy(
        name="upstream-6.16", kernels="Linux 6.16",
        description="HLE/RTM/WAITPKG denylist; capabilities echo the caller's header",
        caps_echoes_caller=True, caps_writes_cmd_back=True, user_tdvmcallinfo_1_r11=0x3,
        denylist=TSX_WAITPKG_DENYLIST, allowlist=None, module_error_kills_vm=False,
    ),
    Policy(
        name="upstream", kernels="Linux 6.19 to 7.3",
        description="HLE/RTM/WAITPKG denylist",
        caps_echoes_caller=False, caps_writes_cmd_back=False, user_tdvmcallinfo_1_r11=0x2,
        denylist=TSX_WAITPKG_DENYLIST, allowlist=None,
    ),
)
POLICY_NAMES: tuple[str, ...] = ("upstream-6.16", "upstream", "rfc-v2")


def _rfc_v2(allowlist: Allowlist) -> Policy:
    return Policy(
        name="rfc-v2", kernels="Linux 7.x with the TDX configurable CPUID allowlist series v2",
        description="allowlist filters capabilities and is enforced in KVM_TDX_INIT_VM",
        caps_echoes_caller=False, caps_writes_cmd_back=False, user_tdvmcallinfo_1_r11=0x2,
        denylist=None, allowlist=allowlist,
    )


def get_policy(name: str, allowlist: Allowlist | None = None) -> Policy:
    """A kernel policy by name; `allowlist` replaces the bundled table of rfc-v2."""
    if name == "rfc-v2":
        return _rfc_v2(allowlist if allowlist is not None else bundled_allowlist())
    for p in POLICIES:
        if p.name == name:
            return p
    raise DataError(f"unknown kernel policy {name!r}: use one of {', '.join(POLICY_NAMES)}")

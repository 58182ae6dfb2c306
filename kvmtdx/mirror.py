"""The mirror: what a kernel policy with a TDX module on a host answers, and why.

Pure code (no I/O).  Public API (other layers code against it):
predict_capabilities, predict_init_vm, reported_entries, is_value_register,
full_request, silently_cleared, CapsPrediction.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.outcome import Outcome
from kvmtdx.policy import Policy
from kvmtdx.profiles import Host, ModuleProfile
from kvmtdx.requests import Request
from kvmtdx.structs import Capabilities, CpuidEntry, InitVm


@dataclass(frozen=True)
class CapsPrediction:
    """KVM_TDX_CAPABILITIES as the caller sees it afterwards."""

    errno: int  # 0 = success
    buffer: bytes | None  # the caller's data buffer after the call, when KVM got to it
    cmd_written_back: bool
    caps: Capabilities | None  # decoded on success


def is_value_register(leaf: int, subleaf: int | None, register: str) -> bool:
    raise NotImplementedError


def reported_entries(module: ModuleProfile, host: Host, policy: Policy) -> tuple[CpuidEntry, ...]:
    raise NotImplementedError


def predict_capabilities(module: ModuleProfile, host: Host, policy: Policy, nent: int, *,
                         flags: int = 0, hw_error: int = 0,
                         caller: bytes | None = None) -> CapsPrediction:
    raise NotImplementedError


def predict_init_vm(module: ModuleProfile, host: Host, policy: Policy,
                    request: Request | InitVm, *, td_initialized: bool = False) -> Outcome:
    raise NotImplementedError


def full_request(module: ModuleProfile, host: Host, policy: Policy) -> Request:
    raise NotImplementedError


def silently_cleared(module: ModuleProfile, host: Host, row_index: int, register: str) -> int:
    raise NotImplementedError

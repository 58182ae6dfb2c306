"""What the simulated kernel keeps between calls: open files, VMs, TDX key IDs."""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx import uapi

_FIRST_KEY_ID = 32  # private HKIDs start above the host's shared ones


class System:
    """An open /dev/kvm."""


@dataclass(slots=True)
class Vm:
    """A VM file: its type and, for a TD, how far it got (kvm_tdx's state)."""

    vm_type: int
    initialized: bool = False
    finalized: bool = False
    key_id: int | None = None
    # kvm_vm_bugged: a TDH.MNG.INIT failure that was not the caller's operand.
    dead: bool = False

    @property
    def is_td(self) -> bool:
        return self.vm_type == uapi.VmType.KVM_X86_TDX_VM


File = System | Vm


class KeyIds:
    """The host's pool of TDX private key IDs; the lowest free one goes first."""

    def __init__(self, count: int) -> None:
        self._free: list[int] = list(range(_FIRST_KEY_ID, _FIRST_KEY_ID + count))

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop(0) if self._free else None

    def release(self, key_id: int) -> None:
        self._free.append(key_id)
        self._free.sort()

"""Seeded kernel bugs: each switches one decision of the simulated kernel.

The verifier proves it catches every one of them, and passes the fixes among them
(`Mutant.fix`: a kernel closing a known hole is stricter than the model, not wrong).
A mutant names the policies whose answers it changes as data (`Mutant.policies`);
`--simulate` refuses it under any other, but the simulated host can switch every
mutant on under any policy.  The simulated kernel asks for a bug by identity
(`bug is FLAGS_UNCHECKED`), so a misspelt name is an error the type checker sees,
not a decision that silently never fires.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtdx.model.policy import POLICY_NAMES


@dataclass(frozen=True, slots=True)
class Mutant:
    name: str
    policies: tuple[str, ...]  # the policies whose answers the bug changes
    summary: str
    # Not a bug: a change a correct kernel may make (closing a known hole).  The verifier
    # must pass it, where it must fail every bug.
    fix: bool = False

    @property
    def description(self) -> str:
        """One line: the policies in brackets, then the summary."""
        tag = "all" if set(self.policies) == set(POLICY_NAMES) else ", ".join(self.policies)
        return f"[{tag}] {self.summary}"


_ALL = POLICY_NAMES
_RFC_V2 = ("rfc-v2",)
_DENYLIST = ("upstream", "upstream-6.16")
_defined: list[Mutant] = []


def _mutant(name: str, policies: tuple[str, ...], summary: str, *, fix: bool = False) -> Mutant:
    m = Mutant(name, policies, summary, fix)
    _defined.append(m)
    return m


CAPS_ALLOWLIST_UNAPPLIED = _mutant(
    "caps_allowlist_unapplied", _RFC_V2,
    "KVM_TDX_CAPABILITIES reports the module's masks without the allowlist filter")
INIT_VM_ALLOWLIST_UNENFORCED = _mutant(
    "init_vm_allowlist_unenforced", _RFC_V2,
    "capabilities are filtered but KVM_TDX_INIT_VM never checks the allowlist")
ALLOWLIST_SKIPS_ROW_7_1 = _mutant(
    "allowlist_skips_row_7_1", _RFC_V2,
    "the INIT_VM allowlist check skips the leaf 7.1 row")
ALLOWLIST_SKIPS_7_0_EDX = _mutant(
    "allowlist_skips_7_0_edx", _RFC_V2,
    "the INIT_VM allowlist check skips register EDX of leaf 7.0")
VALUE_REGISTERS_FILTERED = _mutant(
    "value_registers_filtered", _RFC_V2,
    "value registers (leaf 1 EAX/EBX, 4, 0x18, 0x1F) are treated as features: "
    "zeroed in capabilities, refused in INIT_VM")
CORE_CAPABILITIES_FORGOTTEN = _mutant(
    "core_capabilities_forgotten", _RFC_V2,
    "the allowlist lacks CORE_CAPABILITIES (7.0 EDX bit 30): hidden and rejected")
DENYLIST_HLE_NOT_RTM = _mutant(
    "denylist_hle_not_rtm", _DENYLIST,
    "the TSX denylist covers HLE but forgets RTM")
SUBLEAF_FFFFFFFF_UNMAPPED = _mutant(
    "subleaf_ffffffff_unmapped", _ALL,
    "rows without sub-leaves keep index 0xFFFFFFFF in capabilities and INIT_VM lookups")
GPAW_NOT_FORCED = _mutant(
    "gpaw_not_forced", _ALL,
    "capabilities leave CPUID 0x80000008 EAX[23:16] as the module lists it, not 0xff")
E2BIG_WRITES_BUFFER = _mutant(
    "e2big_writes_buffer", _ALL,
    "CAPABILITIES answers E2BIG after writing a header with the needed nent")
FLAGS_UNCHECKED = _mutant(
    "flags_unchecked", _ALL,
    "kvm_tdx_cmd.flags is not checked by CAPABILITIES or INIT_VM")
RESERVED_UNCHECKED = _mutant(
    "reserved_unchecked", _ALL,
    "INIT_VM does not check that reserved[] is zero")
PADDING_UNCHECKED = _mutant(
    "padding_unchecked", _ALL,
    "INIT_VM does not check that cpuid.padding is zero")
HW_ERROR_NOT_COPIED = _mutant(
    "hw_error_not_copied", _ALL,
    "INIT_VM drops the TDX module status: -EINVAL with hw_error 0")
ALLOWLIST_REJECT_EIO = _mutant(
    "allowlist_reject_eio", _RFC_V2,
    "an allowlist rejection returns -EIO instead of -EINVAL")
# Not a bug by the contract's own verdict: the WARN a request can provoke is the bug
# (spec section 4 step 10, verify's init_vm_no_kernel_warn), and this kernel refuses such a
# request as MODULE_REJECTED with the status in hw_error, as the invariant wants.
MODULE_STATUS_ALWAYS_EINVAL = _mutant(
    "module_status_always_einval", _ALL,
    "a fix of the WARN: INIT_VM maps every TDH.MNG.INIT failure to -EINVAL with the status "
    "in hw_error (no WARN, no -EIO, the VM not marked dead)", fix=True)
KEY_ID_LEAK_ON_FAILURE = _mutant(
    "key_id_leak_on_failure", _ALL,
    "a TD key ID is never freed when TDH.MNG.INIT fails")
DENYLIST_CHECKS_ROW_INDEX = _mutant(
    "denylist_checks_row_index", _DENYLIST,
    "a fix: the denylist tests the row's leaf/index, not the matched entry's, "
    "closing the unflagged-entry bypass", fix=True)
COUNT_CHECK_MISSING = _mutant(
    "count_check_missing", _ALL,
    "INIT_VM does not require every entry to land on a module row (count != nent)")
NENT_LIMIT_OFF_BY_ONE = _mutant(
    "nent_limit_off_by_one", _ALL,
    "INIT_VM refuses nent == 256 with E2BIG (>= instead of >)")
CAPS_HEADER_NOT_ECHOED = _mutant(
    "caps_header_not_echoed", ("upstream-6.16",),
    "capabilities zero the header words 6.16 echoes from the caller")

# Bugs the suite's "both directions, whole domains, lifecycle" checks exist for: each is
# caught by exactly one check (tests/test_verify_breadth.py holds them to that).
LOOKUP_RESUMES_AFTER_FLAGGED_MATCH = _mutant(
    "lookup_resumes_after_flagged_match", _ALL,
    "the CPUID lookup resumes a leaf's search after that leaf's last flagged match "
    "(assumes sub-leaves arrive in ascending order)")
FLAGS_COMPARED_WHOLE = _mutant(
    "flags_compared_whole", _ALL,
    "the CPUID lookup takes an entry's index as significant only when flags is exactly 1: "
    "other flag bits make it match every sub-leaf")
NO_SUBLEAF_INDEX_CHECKED = _mutant(
    "no_subleaf_index_checked", _ALL,
    "an entry for a leaf without sub-leaves must carry index 0, though the lookup ignores it")
STEERED_ENTRY_REFUSED = _mutant(
    "steered_entry_refused", _ALL,
    "a bypass fix gone too far: an unflagged entry the lookup lands on a row of another "
    "index, in a leaf with several rows, is refused whatever it carries")
INIT_VM_VALUE_REGISTERS_FILTERED = _mutant(
    "init_vm_value_registers_filtered", _RFC_V2,
    "capabilities pass value registers unfiltered but the INIT_VM allowlist check treats "
    "them as features: a realistic non-zero value is refused")
RESERVED_CHECK_COVERS_MROWNERCONFIG = _mutant(
    "reserved_check_covers_mrownerconfig", _ALL,
    "INIT_VM's reserved check starts at MROWNERCONFIG: a non-zero measurement is refused")
ATTRIBUTES_CHECKED_32_BITS = _mutant(
    "attributes_checked_32_bits", _ALL,
    "INIT_VM checks only attributes bits 0-31 against supported_attrs: PERFMON (63) "
    "reaches the module")
XFAM_CHECKED_32_BITS = _mutant(
    "xfam_checked_32_bits", _ALL,
    "INIT_VM checks only XFAM bits 0-31 against supported_xfam: the module refuses the rest")
GPAW_RANGE_CHECK = _mutant(
    "gpaw_range_check", _ALL,
    "GPAW accepted anywhere from 48 to 52, a range instead of the two widths")
NENT_SIGNED_COMPARE = _mutant(
    "nent_signed_compare", _ALL,
    "INIT_VM compares nent as a signed int: 0x80000000 and above pass the limit and the "
    "copy fails with ENOMEM instead of E2BIG")
RESERVED_LOW_HALVES_ONLY = _mutant(
    "reserved_low_halves_only", _ALL,
    "INIT_VM's reserved check reads each word as 32 bits: upper halves go unchecked")
ALLOWLIST_STEERED_BY_ENTRY_INDEX = _mutant(
    "allowlist_steered_by_entry_index", _RFC_V2,
    "the INIT_VM allowlist judges an unflagged entry by its own index on every row but 7.0 "
    "(the bypass fixed only where it was reported)")
TD_STATE_SET_BEFORE_CHECKS = _mutant(
    "td_state_set_before_checks", _ALL,
    "INIT_VM marks the TD initialised before KVM's checks and clears it only when "
    "TDH.MNG.INIT fails: a TD KVM refused can never be initialised")
MODULE_REFUSAL_LEAVES_TD_INITIALIZED = _mutant(
    "module_refusal_leaves_td_initialized", _ALL,
    "the teardown after a TDH.MNG.INIT refusal leaves the TD marked initialised: a "
    "corrected INIT_VM on it is refused")
KEY_ID_HELD_AFTER_REFUSAL = _mutant(
    "key_id_held_after_refusal", _ALL,
    "after a TDH.MNG.INIT refusal the TD keeps its key ID until its fd is closed")
CAPS_REFUSED_AFTER_INIT_VM = _mutant(
    "caps_refused_after_init_vm", _ALL,
    "KVM_TDX_CAPABILITIES refused (EINVAL) on a TD once it is initialised")
TD_STATE_CHECKED_AFTER_COPY = _mutant(
    "td_state_checked_after_copy", _ALL,
    "INIT_VM checks that the TD is uninitialised only after reading the request: a second "
    "INIT_VM with nent 257 gets E2BIG")

# In the order `--simulate list` shows them.
CATALOGUE: tuple[Mutant, ...] = tuple(_defined)
BY_NAME: dict[str, Mutant] = {m.name: m for m in CATALOGUE}
# name -> one-line description, as `--simulate list` prints it.
MUTANTS: dict[str, str] = {m.name: m.description for m in CATALOGUE}


def get_mutant(name: str | None) -> Mutant | None:
    if name is None:
        return None
    m = BY_NAME.get(name)
    if m is None:
        raise ValueError(f"unknown mutant {name!r}")
    return m

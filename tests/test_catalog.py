"""The feature-name catalog against the module tables, the rfc-v2 allowlist and the spec."""

from __future__ import annotations

import pytest

from kvmtdx.model import catalog
from kvmtdx.model.policy import bundled_allowlist
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, bundled_json, enumerated, load_profile
from kvmtdx.structs import REGISTERS

VALUE_REGISTERS = {(1, "eax"), (1, "ebx"), (0x80000008, "eax")}
VALUE_LEAVES = {4, 0x18, 0x1F}

# The behaviour contract, section 6: what the series hides on a 2.0 module with
# every feature present, by the names the spec uses (SDM spellings included).
SERIES_HIDES: tuple[tuple[int, int | None, str, int, str], ...] = (
    (1, None, "ecx", 3, "MWAIT"), (1, None, "ecx", 7, "EST"), (1, None, "ecx", 8, "TM2"),
    (1, None, "ecx", 10, "CNXT-ID"), (1, None, "ecx", 11, "SDBG"), (1, None, "ecx", 14, "xTPR"),
    (1, None, "ecx", 18, "DCA"),
    (1, None, "edx", 18, "PSN"), (1, None, "edx", 22, "ACPI"), (1, None, "edx", 28, "HTT"),
    (1, None, "edx", 29, "TM"), (1, None, "edx", 31, "PBE"),
    (7, 0, "ebx", 4, "HLE"), (7, 0, "ebx", 11, "RTM"), (7, 0, "ebx", 12, "RDT-M"),
    (7, 0, "ebx", 15, "RDT-A"),
    (7, 0, "ecx", 0, "PREFETCHWT1"), (7, 0, "ecx", 5, "WAITPKG"), (7, 0, "ecx", 13, "TME"),
    (7, 0, "edx", 18, "PCONFIG"),
    (7, 1, "eax", 3, "RAO-INT"), (7, 1, "eax", 8, "ArchPerfmonExt"),
    (7, 1, "edx", 17, "UIRET_UIF"),
)


def _is_value_register(leaf: int, register: str) -> bool:
    return leaf in VALUE_LEAVES or (leaf, register) in VALUE_REGISTERS


@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_every_listed_feature_bit_has_a_name(module: str) -> None:
    profile = load_profile(module)
    unnamed = []
    for row in profile.rows:
        for i, reg in enumerate(REGISTERS):
            if _is_value_register(row.leaf, reg):
                continue
            mask = row.config_direct[i] | row.allow_direct[i]
            for bit in catalog.set_bits(mask):
                if catalog.bit_name(row.leaf, row.subleaf, reg, bit) == f"bit{bit}":
                    unnamed.append(f"{row.label()} {reg} bit {bit}")
    assert unnamed == []


@pytest.mark.parametrize("module", BUNDLED_MODULES)
def test_value_registers_are_fields(module: str) -> None:
    profile = load_profile(module)
    outside = []
    for row in profile.rows:
        for i, reg in enumerate(REGISTERS):
            if not _is_value_register(row.leaf, reg):
                continue
            mask = row.config_direct[i] | row.allow_direct[i]
            if mask:
                assert catalog.has_fields(row.leaf, row.subleaf, reg), f"{row.label()} {reg}"
            for bit in catalog.set_bits(mask):
                if catalog.field_of(row.leaf, row.subleaf, reg, bit) is None:
                    outside.append((row.leaf, reg, bit))
    # 1.5.x lists leaf 4 EDX bits 31:3 as configurable although the SDM reserves them.
    allowed = {(4, "edx", b) for b in range(3, 32)} if module.startswith("1.5") else set()
    assert set(outside) <= allowed


def test_every_catalog_register_the_brief_names_is_present() -> None:
    for leaf, sub, reg in ((1, None, "ecx"), (1, None, "edx"), (7, 0, "ebx"), (7, 0, "ecx"),
                           (7, 0, "edx"), (7, 1, "eax"), (7, 1, "edx"), (7, 2, "edx"),
                           (0x1C, None, "eax"), (0x23, 0, "eax"), (0x80000008, None, "ebx"),
                           (0x1E, 1, "eax")):
        assert catalog.named_bits(leaf, sub, reg), (hex(leaf), sub, reg)
    for leaf, sub, reg in ((1, None, "eax"), (1, None, "ebx"), (4, 2, "eax"), (0x18, 3, "edx"),
                           (0x1F, 5, "ecx"), (0x80000008, None, "eax")):
        assert catalog.fields(leaf, sub, reg), (hex(leaf), sub, reg)


def test_allowlist_names_are_catalog_names() -> None:
    data = bundled_json("allowlist-rfc-v2.json")
    checked = 0
    for entry in data["allowed"]:
        leaf = int(entry["leaf"], 0)
        sub = entry["subleaf"]
        for bit, name in entry["bits"].items():
            assert catalog.bit_name(leaf, sub, entry["register"], int(bit)) == name
            checked += 1
    assert checked >= 60


def test_spec_series_hides_names_match_the_catalog() -> None:
    profile = load_profile("2.0")
    masks = enumerated(profile, MAX_HOST)
    allow = bundled_allowlist()
    for leaf, sub, reg, bit, name in SERIES_HIDES:
        ours = catalog.bit_name(leaf, sub, reg, bit)
        assert catalog.matches(name, leaf, sub, reg, bit), (name, ours)
        assert catalog.BitRef(leaf, sub, reg, bit) in catalog.find(name), name
        # And the list is right about hiding it: listed by 2.0, absent from the allowlist.
        row = profile.row_index(leaf, sub)
        assert row is not None
        assert masks[row][REGISTERS.index(reg)] >> bit & 1, name
        assert not allow.mask(leaf, 0 if sub is None else sub, reg) >> bit & 1, name


def test_names_follow_linux_then_sdm() -> None:
    assert catalog.bit_name(1, None, "ecx", 10) == "CID"  # Linux X86_FEATURE_CID
    assert catalog.name_origin(1, None, "ecx", 10) == "linux"
    assert catalog.bit_name(7, 0, "ecx", 0) == "PREFETCHWT1"  # Linux has no name
    assert catalog.name_origin(7, 0, "ecx", 0) == "sdm"
    assert catalog.bit_name(7, 2, "edx", 5) == "MCDT_NO"
    assert catalog.name_origin(7, 2, "edx", 5) == "kvm"
    src = catalog.source()
    assert "cpufeatures.h" in src and "SDM" in src


def test_unknown_bits_and_fields() -> None:
    assert catalog.bit_name(1, None, "edx", 10) == "bit10"  # reserved
    assert catalog.bit_name(0x12345, None, "eax", 7) == "bit7"
    assert catalog.bit_name(1, None, "eax", 9) == "FAMILY[1]"
    assert catalog.bit_name(4, 0, "eax", 8) == "SELF_INITIALIZING"
    f = catalog.field_of(0x80000008, 0, "eax", 20)
    assert f is not None and f.name == "GUEST_PHYS_ADDR_BITS" and f.extract(0x00343027) == 0x34
    assert catalog.describe(1, None, "eax", 0x000806F8) == [
        "STEPPING[3:0]=0x8", "MODEL[7:4]=0xf", "FAMILY[11:8]=0x6", "EXT_MODEL[19:16]=0x8"]
    assert catalog.bit_names(7, 0, "ebx", (1 << 4) | (1 << 22)) == ["HLE", "bit22"]
    with pytest.raises(ValueError):
        catalog.bit_name(1, None, "ecx", 32)


def test_subleaf_none_and_zero_are_one_row() -> None:
    # KVM reports "no sub-leaves" as index 0.
    assert catalog.bit_name(1, 0, "ecx", 28) == "AVX"
    assert catalog.bit_name(0x80000008, 0xFFFFFFFF, "ebx", 9) == "WBNOINVD"
    assert catalog.bit_name(7, None, "ebx", 4) == "HLE"
    assert catalog.bit_name(7, 1, "ebx", 4) == "bit4"  # 7.1 EBX is not 7.0 EBX


def test_attributes_and_xfam() -> None:
    assert [catalog.attribute_name(b) for b in (0, 28, 30, 63)] == [
        "DEBUG", "SEPT_VE_DISABLE", "PKS", "PERFMON"]
    assert catalog.attribute_name(40) == "bit40"
    assert catalog.attribute_names(0x8000000070000001) == [
        "DEBUG", "SEPT_VE_DISABLE", "MIGRATABLE", "PKS", "PERFMON"]
    assert [catalog.xfam_name(b) for b in (0, 1, 2, 17, 18)] == [
        "X87", "SSE", "AVX", "AMX_XTILECFG", "AMX_XTILEDATA"]
    assert catalog.xfam_names(0x3) == ["X87", "SSE"]
    assert catalog.xfam_name(63) == "bit63"


def test_no_name_twice_in_a_register() -> None:
    for leaf, sub, reg in ((1, None, "ecx"), (1, None, "edx"), (7, 0, "ebx"), (7, 0, "ecx"),
                           (7, 0, "edx"), (7, 1, "eax"), (7, 1, "edx")):
        names = list(catalog.named_bits(leaf, sub, reg).values())
        assert len(names) == len(set(names))

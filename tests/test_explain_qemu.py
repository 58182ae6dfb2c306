"""QEMU's -cpu names and TDX tables as explain carries them, and the converter that makes the
names from a QEMU tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvmtdx.explain import qemu
from kvmtdx.model import catalog
from kvmtdx.model.profiles import bundled_json
from kvmtdx.structs import NO_SUBLEAF

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_names_by_leaf_subleaf_register_bit() -> None:
    assert qemu.feature_name(7, 0, "edx", 23) == "avx512-fp16"
    assert qemu.feature_name(7, 1, "eax", 4) == "avx-vnni"
    assert qemu.feature_name(1, None, "ecx", 3) == "monitor"
    # KVM's index 0 and the module's "no sub-leaf" find rows without sub-leaves too.
    assert qemu.feature_name(1, 0, "ecx", 3) == qemu.feature_name(1, NO_SUBLEAF, "ecx", 3)
    assert qemu.feature_name(7, 0, "edx", 0) is None


def test_find_and_resolve_a_warning() -> None:
    assert qemu.find_feature("+avx512-fp16") == ((7, 0, "edx", 23),)
    assert qemu.resolve_warning(7, "eax", 4, "avx-vnni") == (7, 1, "eax", 4)
    assert qemu.resolve_warning(7, "edx", 23, None) == (7, 0, "edx", 23)


def test_a_warnings_feature_name_picks_the_sub_leaf() -> None:
    # Bit 4 of EDX is FSRM in sub-leaf 0 and AVX-VNNI-INT8 in sub-leaf 1.
    assert qemu.resolve_warning(7, "edx", 4, "avx-vnni-int8") == (7, 1, "edx", 4)
    assert qemu.resolve_warning(7, "edx", 4, None) == (7, 0, "edx", 4)


def test_xsave_components_name_the_feature_that_enables_them() -> None:
    assert qemu.xfam_enablers(0xE0) == ("avx512f",)
    assert qemu.xfam_enablers(3 << 17) == ("amx-tile",)
    assert qemu.xfam_enablers(1 << 8) == ()  # PT: no component QEMU 10.0 enables


def test_qemu_and_linux_name_the_same_bits_alike() -> None:
    def fold(name: str) -> str:
        return name.replace("-", "").replace("_", "").lower()

    for leaf, sub, reg, bit in ((7, 0, "ebx", 16), (7, 0, "ecx", 5), (7, 0, "edx", 23),
                                (7, 1, "eax", 4), (1, None, "ecx", 28)):
        q = qemu.feature_name(leaf, sub, reg, bit)
        assert q is not None and fold(q) == fold(catalog.bit_name(leaf, sub, reg, bit))


def test_the_tdx_table() -> None:
    t = qemu.tdx_table()
    assert t.fixed1[(1, None, "edx")] & 1 and t.fixed1[(1, None, "edx")] >> 26 & 1  # fpu, sse2
    assert t.attributes[((7, 0, "ecx"), 31)] == 30 and catalog.attribute_name(30) == "PKS"
    assert t.xfam[((7, 0, "edx"), 23)] == 5
    assert (0xD, 1, "eax") in t.leaves and t.source["commit"].startswith("05caf269")


def test_the_bundled_names_record_their_source() -> None:
    data: Any = bundled_json(qemu.DATA_FILE)
    src = data["source"]
    assert src["project"] == "QEMU" and src["version"] and len(src["sha256"]) == 64
    assert "0048035a870312f2fd0f3dd28115398d26e419bb" in src["note"]
    assert qemu.source().startswith("QEMU 10.0.13 target/i386/cpu.c")


FAKE_CPU_C = """
FeatureWordInfo feature_word_info[FEATURE_WORDS] = {
    [FEAT_1_ECX] = {
        .type = CPUID_FEATURE_WORD,
        .feat_names = {
            "pni" /* sse3 */, NULL, "dtes64", NULL,
            [28] = "avx",
        },
        .cpuid = { .eax = 1, .reg = R_ECX, },
    },
    [FEAT_7_0_EBX] = {
        .type = CPUID_FEATURE_WORD,
        .feat_names = { [16] = "avx512f" },
        .cpuid = { .eax = 7, .needs_ecx = true, .ecx = 0, .reg = R_EBX, },
    },
    [FEAT_ARCH_CAPABILITIES] = {
        .type = MSR_FEATURE_WORD,
        .feat_names = { "rdctl-no" },
        .msr = { .index = MSR_IA32_ARCH_CAPABILITIES, },
    },
};
ExtSaveArea x86_ext_save_areas[XSAVE_STATE_AREA_COUNT] = {
    [XSTATE_YMM_BIT] = { .feature = FEAT_1_ECX, .bits = CPUID_EXT_AVX, .size = 1 },
    [XSTATE_OPMASK_BIT] = { .feature = FEAT_7_0_EBX, .bits = CPUID_7_0_EBX_AVX512F },
};
"""
FAKE_CPU_H = """
#define CPUID_EXT_AVX      (1U << 28)
#define CPUID_7_0_EBX_AVX512F (1U << 16) /* AVX-512 Foundation */
#define XSTATE_YMM_BIT 2
#define XSTATE_OPMASK_BIT 5
"""


def test_the_converter_reads_a_qemu_tree(tmp_path: Path) -> None:
    src = tmp_path / "target" / "i386"
    src.mkdir(parents=True)
    (src / "cpu.c").write_text(FAKE_CPU_C)
    (src / "cpu.h").write_text(FAKE_CPU_H)
    (tmp_path / "VERSION").write_text("99.0.0\n")
    res = subprocess.run([str(SCRIPTS / "convert-qemu-features"), str(tmp_path), "--commit",
                          "abc123"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["source"]["version"] == "99.0.0" and data["source"]["commit"] == "abc123"
    assert data["features"] == [
        {"word": "FEAT_1_ECX", "leaf": "0x1", "subleaf": None, "register": "ecx",
         "bits": {"0": "pni", "2": "dtes64", "28": "avx"}},
        {"word": "FEAT_7_0_EBX", "leaf": "0x7", "subleaf": 0, "register": "ebx",
         "bits": {"16": "avx512f"}},
    ]
    assert [(c["xfam_bit"], c["feature"]) for c in data["xsave_components"]] == [
        (2, "avx"), (5, "avx512f")]


def test_the_converter_says_what_is_not_a_qemu_tree(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(SCRIPTS / "convert_qemu_features.py"),
                          str(tmp_path)], capture_output=True, text=True, check=False)
    assert res.returncode == 1 and "not a QEMU source tree" in res.stderr

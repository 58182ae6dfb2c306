"""The converted TDX module tables hold what the module source says, and the converter works.

Expected values below were read by hand from the public intel/tdx-module source
(file and line named per assertion); they are not derived from the JSON under test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from kvmtdx.model.host_files import load_host
from kvmtdx.model.tdx_host import (
    HostCpu,
    host_problems,
    reported_attributes_fixed0,
    reported_xfam_fixed0,
)
from kvmtdx.model.tdx_module_tables import (
    ALIASES,
    BUNDLED_VERSIONS,
    TablesError,
    load_tables,
    tables_from_json,
)

ROOT = Path(__file__).resolve().parent.parent
CONVERTER = ROOT / "scripts" / "convert-tdx-module"


def row(version: str, leaf: int, subleaf: int | None) -> tuple[int, ...]:
    t = load_tables(version)
    for r in t.configurable:
        if r.key == (leaf, subleaf):
            return (*r.config_direct, *r.allow_direct)
    raise AssertionError(f"no row 0x{leaf:x}.{subleaf} in {version}")


def test_names_and_aliases() -> None:
    assert BUNDLED_VERSIONS == ("1.5.01", "1.5.05", "2.0.08")
    assert load_tables("1.5-late") is load_tables("1.5.05")
    assert load_tables("2.0").version == "2.0.08"
    assert set(ALIASES) == {"1.5-late", "2.0"}
    with pytest.raises(TablesError, match=r"unknown TDX module '9\.9'"):
        load_tables("9.9")


def test_provenance_names_repo_commit_and_files() -> None:
    assert load_tables("1.5.01").source["tag"] == "TDX_1.5.01"
    assert load_tables("1.5.01").source["commit"].startswith("72d8cffb214b")
    assert load_tables("1.5.05").source["commit"].startswith("e98d9639138d")
    assert load_tables("2.0.08").source["commit"].startswith("1666adc494db")
    assert load_tables("2.0.08").source["files"]["cpuid_tables"] == \
        "include/auto_gen_2_0/cpuid_configurations.c"
    for v in BUNDLED_VERSIONS:
        assert load_tables(v).source["repo"] == "intel/tdx-module"


def test_row_counts_and_order() -> None:
    # cpuid_configurations_defines.h: MAX_NUM_CPUID_CONFIG 12 (1.5.01), 18 (1.5.05).
    assert len(load_tables("1.5.01").configurable) == 12
    assert len(load_tables("1.5.05").configurable) == 18
    assert len(load_tables("2.0.08").configurable) == 28
    # cpuid_configurable[10] is 7.2 and [11] is 0x23 (1.5.01 cpuid_configurations.c:488 and :502).
    assert load_tables("1.5.01").row_keys()[9:12] == ((0x80000008, None), (7, 2), (0x23, 0))


def test_config_masks_read_by_hand() -> None:
    # 1.5.01 include/auto_gen/cpuid_configurations.c:480, cpuid_configurable[5] (leaf 7.0).
    assert row("1.5.01", 7, 0) == (0, 0, 0, 0, 0, 0xDC2B9B18, 0x02417F65, 0x0005411C)
    # 1.5.05 include/auto_gen/cpuid_configurations.c:514, cpuid_configurable[6] (leaf 7.1).
    assert row("1.5.05", 7, 1)[4:] == (0x04001D30, 0, 0, 0x430)
    # 1.5.05 cpuid_configurations.c:531-534, cpuid_configurable[12] (0x1F.0) config_direct.
    assert row("1.5.05", 0x1F, 0)[:4] == (0x1F, 0xFFFF, 0xFFFF, 0)
    # 2.0.08 include/auto_gen_2_0/cpuid_configurations.c, cpuid_configurable[5], [6], [9].
    assert row("2.0.08", 7, 0)[7] == 0x4005411C
    assert row("2.0.08", 7, 1)[4] == 0x04A81DBF
    assert row("2.0.08", 0x80000008, None)[0] == 0xFF


def test_lookup_entries_read_by_hand() -> None:
    t = load_tables("1.5.01")
    leaf1 = t.lookup_at(1, None)
    assert leaf1 is not None and leaf1.index == 0
    # 1.5.01 cpuid_configurations.c:48, cpuid_lookup[0] fixed0_or_dynamic.
    assert leaf1.fixed0_or_dynamic == (0xF000C000, 0xFF0000FF, 0x08010060, 0x40120400)
    # 1.5.01 cpuid_configurations.c:330-333: 0x1F.0 is faulting, with no config row.
    topo = t.lookup_at(0x1F, 0)
    assert topo is not None and topo.faulting and topo.config_index is None
    # 1.5.05 cpuid_configurations.c:144: 0xB.0 is lookup entry 64; 1.5.01 has no 0xB.
    b0 = load_tables("1.5.05").lookup_at(0xB, 0)
    assert b0 is not None and b0.index == 64
    assert t.lookup_at(0xB, 0) is None


def test_processing_order_is_the_lookup_index() -> None:
    keys = [e.key for e in load_tables("1.5.05").lookup]
    assert keys[:10] == [(1, None), (4, 0), (4, 1), (4, 2), (4, 3), (7, 0), (7, 1),
                         (0xA, None), (0x1C, None), (0x80000008, None)]
    assert keys.index((7, 2)) == 14
    assert keys.index((0x1F, 0)) < keys.index((0x23, 0))
    assert [e.index for e in load_tables("2.0.08").lookup] == sorted(
        e.index for e in load_tables("2.0.08").lookup)


def test_xfam_masks_read_by_hand() -> None:
    # 1.5.01 cpuid_configurations.c:523: XFAM[5] gates AVX-512 bits of 7.0 EBX.
    assert load_tables("1.5.01").xfam_mask("xfam_mask_0x7_0x0", 5) == (0, 0xDC230000, 0x5842,
                                                                      0x80010C)
    # 1.5.05 cpuid_configurations.c:598: XFAM[2] gates AVX-VNNI (7.1 EAX[4]) and 7.1 EDX.
    assert load_tables("1.5.05").xfam_mask("xfam_mask_0x7_0x1", 2) == (0x10, 0, 0, 0x430)
    # 2.0.08 xfam_mask_0x7_0x1[17]: AMX-FP16 (7.1 EAX[21]) needs AMX.
    assert load_tables("2.0.08").xfam_mask("xfam_mask_0x7_0x1", 17) == (0x200000, 0, 0, 0)
    assert load_tables("1.5.01").xfam_mask("xfam_mask_0x7_0x1", 17) == (0, 0, 0, 0)


def test_fixed_bits_read_by_hand() -> None:
    # 1.5.01 src/common/data_structures/td_control_structures.h:227 and :318.
    t = load_tables("1.5.01")
    assert (t.attributes_fixed0, t.xfam_fixed0, t.xfam_fixed1) == (0x8000000070000001, 0x6DBE7,
                                                                  0x3)
    # 2.0.08 td_control_structures.h: DEBUG|PMT_PROF|ICSSD|LASS|SEPT_VE|MIGRATABLE|PKS|TPA|PERFMON.
    assert load_tables("2.0.08").attributes_fixed0 == 0xC000000078010041
    assert load_tables("2.0.08").config_flags_fixed0 == 0x1F
    assert load_tables("1.5.05").config_flags_fixed0 == 0x7
    assert load_tables("1.5.05").max_vcpus_per_td == 576
    assert load_tables("2.0.08").max_vcpus_per_td == 1376


def test_fixed0_bitmap_read_by_hand() -> None:
    # include/auto_gen_2_0/cpuid_configurations_defines.h at intel/tdx-module 1666adc4; the
    # 1.5 tables (72d8cffb, e98d9639) define no CPUID_FIXED0_BITMAP.
    t = load_tables("2.0")
    assert t.constants["CPUID_FIXED0_BITMAP"] == 0x0380000508CFD308
    assert t.constants["CPUID_FIXED0_BITMAP_BASE_RANGE"] == 52
    for name in ("1.5.01", "1.5-late"):
        assert load_tables(name).constants["CPUID_FIXED0_BITMAP"] is None


def test_platform_attribute_bits() -> None:
    # 1.5.05 tdh_sys_init.c:1381: LASS leaves ATTRIBUTES_FIXED0 without CPU LASS support;
    # 2.0.08 also sets TPA from is_tdx_io_supported().
    assert [(p.bit, p.needs) for p in load_tables("2.0.08").attributes_platform] == [
        (27, "lass_supported"), (62, "is_tdx_io_supported")]
    assert load_tables("1.5.01").attributes_platform == ()
    host = load_host()
    assert reported_attributes_fixed0(load_tables("2.0"), host) == 0xC000000078010041
    no_lass = dict(host.native)
    a, b, c, d = no_lass[(7, 1)]
    no_lass[(7, 1)] = (a & ~(1 << 6), b, c, d)
    plain = replace(host, native=no_lass, tdx_io=False)
    assert reported_attributes_fixed0(load_tables("2.0"), plain) == 0x8000000070010041
    assert reported_xfam_fixed0(load_tables("2.0"), host) == 0x6DBE7


def test_allowed_fms_table() -> None:
    # 1.5.05 src/common/helpers/cpuid_fms.h:43 SRF_LATEST_STEPPING 0x3; cpuid_fms.c order.
    assert load_tables("1.5.05").allowed_fms == (0xD06D0, 0xA06E0, 0xA06D0, 0xA06F3, 0xC06F2,
                                                 0x806F8)
    assert load_tables("2.0.08").allowed_fms[0] == 0xD06D1


def test_max_host_passes_every_module_sys_init() -> None:
    host = load_host("max")
    for v in BUNDLED_VERSIONS:
        assert host_problems(load_tables(v), host) == [], v
    assert "constructed" in host.about or "built by kvmtdx" in host.about


def test_all_ones_host_has_no_valid_topology() -> None:

    ones = HostCpu("ones", {(leaf, None): (0xFFFFFFFF,) * 4 for leaf in (0, 1, 7, 0x1F)},
                   tsx_ctrl=True, ept_5level=True, tdx_io=True)
    problems = host_problems(load_tables("2.0"), ones)
    assert any("0x1F" in p for p in problems)


def test_malformed_table_is_one_clear_error() -> None:
    with pytest.raises(TablesError, match=r"x\.json: not a schema-1"):
        tables_from_json({"schema": 2}, "x.json")
    data = json.loads((ROOT / "kvmtdx/data/tdx-modules/1.5.01.json").read_text())
    del data["cpuid_lookup"][0]["fixed1"]
    with pytest.raises(TablesError, match=r"y\.json: malformed"):
        tables_from_json(data, "y.json")


def test_package_data_ships_the_tables() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"data/tdx-modules/*.json"' in text and '"data/tdx-hosts/*.json"' in text


# ---------------------------------------------------------------------------
# The converter, on a small tree written here in the module's own formats.

TINY_TABLES = """
const cpuid_lookup_t cpuid_lookup[MAX_NUM_CPUID_LOOKUP] = {
 [1] = { .leaf_subleaf = {.leaf = 0x6, .subleaf = 0xffffffff},
  .valid_entry = true,
  .faulting = true,
  .verify_mask = { .eax = 0x800000 },
  .config_index = CPUID_CONFIG_NULL_IDX
  },
 [0] = { .leaf_subleaf = {.leaf = 0x7, .subleaf = 0x0},
  .valid_entry = true,
  .fixed1 = { .ecx = 0x80 },
  .fixed0_or_dynamic = { .ebx = 0x404006 },
  .config_index = 0
  }
};
const cpuid_configurable_t cpuid_configurable[MAX_NUM_CPUID_CONFIG] = {
 [0] = { .leaf_subleaf = {.leaf = 0x7, .subleaf = 0x0},
  .valid_entry = true,
  .allow_direct = { .ebx = 0x10, .edx = 0x4 },
  .lookup_index = 0
  }
};
const cpuid_config_return_values_t xfam_mask_0x7_0x0[XCR0_MAX_VALID_BIT + 1] = {
    [5]={ .ebx = 0x10000 } ,
};
"""

TINY_FILES = {
    "proj_defs.mk": "PROJ_FLAGS += -DTDX_MODULE_MAJOR_VER=1\n"
                    "PROJ_FLAGS += -DTDX_MODULE_MINOR_VER=5\n"
                    "PROJ_FLAGS += -DTDX_MODULE_UPDATE_VER=7\n",
    "include/auto_gen/cpuid_configurations.c": TINY_TABLES,
    "include/auto_gen/cpuid_configurations_defines.h":
        "#define MAX_NUM_CPUID_LOOKUP 2\n#define CPUID_FIXED0_BITMAP      0x0380000000000208\n"
        "#define CPUID_FIXED0_BITMAP_BASE_RANGE 52\n",
    "src/common/data_structures/td_control_structures.h":
        "#define TDX_ATTRIBUTES_PKS_SUPPORT BIT(30)\n#define TDX_ATTRIBUTES_LASS_SUPPORT BIT(27)\n"
        "#define TDX_ATTRIBUTES_FIXED0 (0x1 | TDX_ATTRIBUTES_PKS_SUPPORT | \\\n"
        "                               TDX_ATTRIBUTES_LASS_SUPPORT)\n"
        "#define TDX_ATTRIBUTES_FIXED1 0x0\n#define TDX_XFAM_FIXED0 0x0006DBE7ULL\n"
        "#define TDX_XFAM_FIXED1 0x00000003ULL\n#define CONFIG_FLAGS_FIXED0 (BIT(0) | BIT(2))\n"
        "#define CONFIG_FLAGS_FIXED1 0x0\n#define VIRT_TSC_FREQUENCY_MIN 4\n"
        "#define VIRT_TSC_FREQUENCY_MAX 400 // 10 GHz\n",
    "src/common/x86_defs/x86_defs.h":
        "#define XCR0_USER_BIT_MASK 0x000602FF\n#define XCR0_SUPERVISOR_BIT_MASK 0x0001FD00\n"
        "#define XCR0_MAX_VALID_BIT 18\n#define MIN_PA_FOR_PML5 49ULL\n"
        "#define LA57_LINEAR_ADDRESS_WIDTH 57\n#define LEGACY_LINEAR_ADDRESS_WIDTH 48\n"
        "typedef enum { LEVEL_TYPE_INVALID = 0, LEVEL_TYPE_MAX = 6 } e;\n",
    "src/vmm_dispatcher/api_calls/tdh_sys_init.c":
        "attributes_fixed0.raw = TDX_ATTRIBUTES_FIXED0;\n"
        "if (!tdx_global_data_ptr->lass_supported)\n{\n"
        "    attributes_fixed0.raw &= ~TDX_ATTRIBUTES_LASS_SUPPORT;\n}\n",
    "src/common/helpers/cpuid_fms.h":
        "#define SPR_NATIVE_FMS 0x806F0\n#define SPR_LATEST_STEPPING 0x8\n",
    "src/common/helpers/cpuid_fms.c":
        "const fms_info_t allowed_fms[TOTAL_KNOWN_FMS] = {\n"
        "    { .raw = (SPR_NATIVE_FMS | SPR_LATEST_STEPPING) },\n};\n",
}


def write_tree(root: Path, skip: str = "") -> Path:
    for rel, text in TINY_FILES.items():
        if rel != skip:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
    return root


def convert(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CONVERTER), *args], capture_output=True,
                          text=True, check=False)


def test_converter_reads_a_tree(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src")
    res = convert(str(src), "--commit", "a" * 40, "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "out" / "1.5.07.json").read_text())
    assert [(e["index"], e["leaf"]) for e in data["cpuid_lookup"]] == [(0, "0x7"), (1, "0x6")]
    assert data["cpuid_lookup"][1]["faulting"] is True
    assert data["cpuid_lookup"][0]["fixed1"] == ["0x00000000", "0x00000000", "0x00000080",
                                                 "0x00000000"]
    assert data["cpuid_configurable"][0]["allow_direct"][3] == "0x00000004"
    assert data["xfam_masks"]["xfam_mask_0x7_0x0"]["5"][1] == "0x00010000"
    assert data["attributes_fixed0"] == "0x48000001"
    assert data["config_flags_fixed0"] == "0x5"
    assert data["attributes_platform"] == [{"bit": 27, "name": "LASS", "needs": "lass_supported"}]
    assert data["allowed_fms"] == ["0x806f8"]
    assert data["constants"]["CPUID_FIXED0_BITMAP"] == "0x0380000000000208"
    assert data["constants"]["CPUID_FIXED0_BITMAP_BASE_RANGE"] == 52
    assert data["source"]["files"]["cpuid_defines"] == \
        "include/auto_gen/cpuid_configurations_defines.h"
    assert data["source"]["commit"] == "a" * 40
    loaded = tables_from_json(data, "tiny")
    assert loaded.variant.topology == "1.5"


def test_converter_without_the_defines_has_no_fixed0_bitmap(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", skip="include/auto_gen/cpuid_configurations_defines.h")
    res = convert(str(src), "--commit", "a" * 40, "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "out" / "1.5.07.json").read_text())
    assert data["constants"]["CPUID_FIXED0_BITMAP"] is None
    assert "cpuid_defines" not in data["source"]["files"]


def test_converter_names_the_missing_file(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", skip="src/common/helpers/cpuid_fms.c")
    res = convert(str(src), "--commit", "a" * 40, "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "missing src/common/helpers/cpuid_fms.c" in res.stderr


def test_converter_needs_a_commit_for_a_plain_tree(tmp_path: Path) -> None:
    res = convert(str(write_tree(tmp_path / "src")), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "give --commit" in res.stderr


def test_converter_refuses_tables_that_do_not_point_at_each_other(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src")
    tables = src / "include/auto_gen/cpuid_configurations.c"
    tables.write_text(TINY_TABLES.replace(".lookup_index = 0", ".lookup_index = 1"))
    res = convert(str(src), "--commit", "a" * 40, "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "do not point at each other" in res.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_converter_reads_a_git_revision(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "tiny"], check=True)
    res = convert(str(src / ".git"), "--rev", "HEAD", "--tag", "TINY", "--out",
                  str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "out" / "1.5.07.json").read_text())
    head = subprocess.run([*git[:3], "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert data["source"]["commit"] == head and data["source"]["tag"] == "TINY"


def test_tdx_module_model_is_pure() -> None:
    names = ("tdx_status", "tdx_module_tables", "tdx_host", "tdx_cpuid", "tdx_topology",
             "tdx_module")
    code = ("import sys\n" + "".join(f"import kvmtdx.model.{n}\n" for n in names)
            + "print('cffi' in sys.modules, 'kvmtdx.uapi' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert res.stdout.split() == ["False", "False"]
    for n in names:
        source = (ROOT / "kvmtdx" / "model" / f"{n}.py").read_text()
        assert "import os" not in source and "open(" not in source, n

"""The cffi view of cdefs/kvm_tdx.h against the real Linux uapi headers, compiled with gcc.

Every struct and field cffi knows from cdefs is checked (sizeof, offsetof, and
the size of each member), and every ioctl number and constant kvmtdx.uapi uses.
The headers are the system's when they declare the TDX structs, else the ones
scripts/fetch-headers unpacked into .cache/linux-headers.  Without either the
test skips, except in CI (CI=true), where a skip would hide a broken binding.

A second test builds a wheel and imports kvmtdx.uapi from it with the source
tree out of reach: the cdefs must ship inside the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from kvmtdx import layout, uapi
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, KVM_MAX_CPUID_ENTRIES
from kvmtdx.uapi import ffi

ROOT = Path(__file__).resolve().parent.parent
CACHED_INCLUDE = ROOT / ".cache" / "linux-headers" / "hdr" / "usr" / "include"
SYSTEM_INCLUDE = Path("/usr/include")
ARCH_DIR = "x86_64-linux-gnu"
MARKER = "kvm_tdx_capabilities"

STRUCTS = (
    "kvm_cpuid_entry2",
    "kvm_cpuid2",
    "kvm_tdx_cmd",
    "kvm_tdx_capabilities",
    "kvm_tdx_init_vm",
    "kvm_enable_cap",
)

# Names as the uapi headers spell them; the values must match kvmtdx.uapi's.
CONSTANTS = (
    "KVM_GET_API_VERSION",
    "KVM_CREATE_VM",
    "KVM_CHECK_EXTENSION",
    "KVM_GET_SUPPORTED_CPUID",
    "KVM_MEMORY_ENCRYPT_OP",
    "KVM_CREATE_VCPU",
    "KVM_SET_CPUID2",
    "KVM_GET_CPUID2",
    "KVM_ENABLE_CAP",
    "KVM_CAP_SPLIT_IRQCHIP",
    "KVM_API_VERSION",
    "KVM_CAP_VM_TYPES",
    "KVM_X86_DEFAULT_VM",
    "KVM_X86_SW_PROTECTED_VM",
    "KVM_X86_SEV_VM",
    "KVM_X86_SEV_ES_VM",
    "KVM_X86_SNP_VM",
    "KVM_X86_TDX_VM",
    "KVM_TDX_CAPABILITIES",
    "KVM_TDX_INIT_VM",
    "KVM_TDX_INIT_VCPU",
    "KVM_TDX_INIT_MEM_REGION",
    "KVM_TDX_FINALIZE_VM",
    "KVM_TDX_GET_CPUID",
    "KVM_CPUID_FLAG_SIGNIFCANT_INDEX",
)


def _cffi_layout() -> dict[str, int]:
    """'sizeof S', 'offsetof S.f', 'sizeof S.f' for every struct and field of the cdefs."""
    out: dict[str, int] = {}
    for s in STRUCTS:
        t = ffi.typeof(f"struct {s}")
        out[f"sizeof {s}"] = ffi.sizeof(f"struct {s}")
        for name, f in t.fields:
            out[f"offsetof {s}.{name}"] = f.offset
            if not (f.type.kind == "array" and f.type.length is None):
                out[f"sizeof {s}.{name}"] = ffi.sizeof(f.type.cname)
    return out


CFFI_LAYOUT = _cffi_layout()


def _pure_layout() -> dict[str, int]:
    """The same keys as kvmtdx.layout reads them, without cffi."""
    out: dict[str, int] = {}
    for name in STRUCTS:
        s = layout.STRUCTS[name]
        out[f"sizeof {name}"] = s.size
        for f in s.fields:
            out[f"offsetof {name}.{f.name}"] = f.offset
            if f.count != 0:
                out[f"sizeof {name}.{f.name}"] = f.size
    return out


PURE_LAYOUT = _pure_layout()


def test_pure_layout_reads_the_cdefs_as_cffi_does() -> None:
    assert PURE_LAYOUT == CFFI_LAYOUT


def test_every_cdefs_struct_is_covered() -> None:
    # A struct added to cdefs but not to STRUCTS would escape the comparison.
    declared = {line.split()[1] for line in layout.cdefs_text().splitlines()
                if line.startswith("struct ") and line.rstrip().endswith("{")}
    assert declared == set(STRUCTS)


def _has_tdx(include: Path) -> bool:
    for rel in (f"{ARCH_DIR}/asm/kvm.h", "asm/kvm.h"):
        h = include / rel
        if h.is_file() and MARKER in h.read_text(errors="replace"):
            return True
    return False


def _include_dirs() -> list[Path] | None:
    for inc in (SYSTEM_INCLUDE, CACHED_INCLUDE):
        if _has_tdx(inc):
            return [inc, inc / ARCH_DIR]
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the layout test for real: {reason}")
    pytest.skip(reason)


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "#define SZ(s) printf(\"sizeof %s %zu\\n\", #s, sizeof(struct s))",
        "#define OFF(s, f) printf(\"offsetof %s.%s %zu\\n\", #s, #f, offsetof(struct s, f))",
        "#define FSZ(s, f) printf(\"sizeof %s.%s %zu\\n\", #s, #f, sizeof(((struct s *)0)->f))",
        "#define K(n) printf(\"const %s %llu\\n\", #n, (unsigned long long)(n))",
        "int main(void) {",
    ]
    for key in CFFI_LAYOUT:
        kind, _, what = key.partition(" ")
        s, _, f = what.partition(".")
        if kind == "offsetof":
            lines.append(f"  OFF({s}, {f});")
        elif f:
            lines.append(f"  FSZ({s}, {f});")
        else:
            lines.append(f"  SZ({s});")
    lines += [f"  K({n});" for n in CONSTANTS]
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_view(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    includes = _include_dirs()
    if includes is None:
        _unavailable(
            "neither the system's nor cached uapi headers declare struct kvm_tdx_capabilities "
            "(run scripts/fetch-headers for linux-libc-dev 7.x)"
        )
        raise AssertionError("unreachable")
    gcc = shutil.which("gcc")
    if gcc is None:
        _unavailable("gcc is not installed")
        raise AssertionError("unreachable")
    d = tmp_path_factory.mktemp("layout")
    src = d / "layout.c"
    src.write_text(_c_program())
    exe = d / "layout"
    cmd = [gcc, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)]
    cmd[1:1] = [f"-I{p}" for p in includes]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"gcc failed:\n{res.stderr}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    view: dict[str, int] = {}
    for line in out.splitlines():
        key, _, value = line.rpartition(" ")
        view[key] = int(value)
    return view


@pytest.mark.parametrize("key", sorted(CFFI_LAYOUT))
def test_struct_layout_matches_header(c_view: dict[str, int], key: str) -> None:
    assert c_view[key] == CFFI_LAYOUT[key], key
    assert c_view[key] == PURE_LAYOUT[key], key


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_header(c_view: dict[str, int], name: str) -> None:
    assert c_view[f"const {name}"] == _ours(name), name


def _ours(name: str) -> int:
    """kvmtdx's value for a header constant, wherever its one home is."""
    for home in (uapi.Ioctl, uapi.VmType, uapi.TdxCommand, uapi.Cap):
        if name in home.__members__:
            return int(home[name])
    if name == "KVM_CPUID_FLAG_SIGNIFCANT_INDEX":
        return FLAG_SIGNIFICANT_INDEX
    value: Any = getattr(uapi, name)
    return int(value)


def test_layout_numbers_match_the_spec() -> None:
    # The spec's table (section 1), independent of any header: a second witness.
    assert CFFI_LAYOUT["sizeof kvm_cpuid_entry2"] == 40
    assert CFFI_LAYOUT["sizeof kvm_tdx_cmd"] == 24
    assert CFFI_LAYOUT["sizeof kvm_tdx_capabilities"] == 2056
    assert CFFI_LAYOUT["offsetof kvm_tdx_capabilities.cpuid"] == 2048
    assert CFFI_LAYOUT["sizeof kvm_tdx_init_vm"] == 264
    assert CFFI_LAYOUT["offsetof kvm_tdx_init_vm.cpuid"] == 256
    # struct kvm_enable_cap: u32 cap, u32 flags, u64 args[4], u8 pad[64].
    assert CFFI_LAYOUT["sizeof kvm_enable_cap"] == 104
    assert CFFI_LAYOUT["offsetof kvm_enable_cap.pad"] == 40
    assert int(uapi.Ioctl.KVM_MEMORY_ENCRYPT_OP) == 0xC008AEBA
    assert int(uapi.Ioctl.KVM_GET_API_VERSION) == 0xAE00
    # Kernel-internal, absent from the uapi: only the spec value to compare with.
    assert KVM_MAX_CPUID_ENTRIES == 256


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of the source tree as it is, built offline where the machine allows."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
        else:
            (src / name).write_text("kvmtdx\n")
    for tree in ("kvmtdx", "cdefs"):
        shutil.copytree(ROOT / tree, src / tree,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
            "-q", "-w", str(wheels), str(src)]
    # Offline first, with the setuptools at hand; older setuptools needs the
    # 'wheel' package for that, so fall back to pip's isolated build.
    res = subprocess.run([*base, "--no-build-isolation", "--no-index"], capture_output=True,
                         text=True, check=False, cwd=tmp_path)
    if res.returncode != 0:
        res = subprocess.run(base, capture_output=True, text=True, check=False, cwd=tmp_path)
    if res.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{res.stdout}\n{res.stderr}")
    (wheel,) = wheels.glob("kvmtdx-*.whl")
    return wheel


def test_cdefs_load_from_an_installed_wheel(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert "kvmtdx/cdefs/kvm_tdx.h" in z.namelist()
        # The kernel-source backend's shim and the bundled patch ship too.
        assert {"kvmtdx/kernelsrc/shim/kshim.h", "kvmtdx/kernelsrc/shim/kglue.c",
                "kvmtdx/data/patches/rfc-v2.patch"} <= set(z.namelist())
        z.extractall(site)
    # The source-tree fallback (a top-level cdefs/ beside the package) must not exist here.
    assert not (site / "cdefs").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import kvmtdx.uapi as u, kvmtdx.cdefs as c; "
        "print(u.__file__); print(c.__file__); "
        "print(u.ffi.sizeof('struct kvm_tdx_capabilities'), u.Ioctl.KVM_MEMORY_ENCRYPT_OP)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=False, cwd=elsewhere, env=env)
    assert res.returncode == 0, res.stderr
    uapi_file, cdefs_file, numbers = res.stdout.splitlines()
    assert Path(uapi_file).is_relative_to(site)
    assert Path(cdefs_file).is_relative_to(site)
    assert numbers == f"2056 {0xC008AEBA}"
    # Every subpackage and data file of the source tree must ship too, and the
    # installed tool must run its main job from the wheel alone.
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (ROOT / "kvmtdx").rglob("*"):
        if "__pycache__" in path.parts or path.is_dir():
            continue
        if path.suffix in (".py", ".json", ".typed"):
            rel = path.relative_to(ROOT).as_posix()
            assert rel in names, f"{rel} is missing from the wheel"
    res = subprocess.run(
        [sys.executable, "-m", "kvmtdx", "verify", "--simulate", "1.5.01:rfc-v2",
         "--format", "ktap"],
        capture_output=True, text=True, check=False, cwd=elsewhere, env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("KTAP version 1")

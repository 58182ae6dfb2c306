"""The kernel-source backend: Linux 7.3's own TDX code, compiled, judged by verify.

Upstream 7.3 must fail exactly the denylist-bypass checks, the reconstructed
rfc-v2 series must pass, a bug a user puts in the tree must be caught, and
every way the backend can be refused (no compiler, no TDX code, a patch
that does not apply, a function a series renamed) is one clear error.
"""

from __future__ import annotations

import difflib
import errno
import json
from dataclasses import replace
from pathlib import Path

import pytest
from kernelsrc_support import BYPASS, WARN, backend, copy_tree, failed, linux_tree, verify

from kvmtdx.device import Kvm
from kvmtdx.errors import ExitCode, KvmError
from kvmtdx.kernelsrc import KernelSourceError, bundled_patches, open_backend
from kvmtdx.kernelsrc.extract import TDX_C
from kvmtdx.model import mirror
from kvmtdx.model.policy import bundled_allowlist, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, load_profile, profile_from_json
from kvmtdx.model.requests import Request
from kvmtdx.model.rules import ANY, VALUE_REGISTERS
from kvmtdx.session import kernel_source_backend
from kvmtdx.sim import SimulatedHost
from kvmtdx.structs import FLAG_SIGNIFICANT_INDEX, CpuidEntry, InitVm

COUNT_CHECK = "\tif (copy_cnt != cpuid->nent)\n\t\treturn -EINVAL;\n"


@pytest.fixture(scope="module")
def tree() -> Path:
    return linux_tree()


def user_patch(tree: Path, tmp_path: Path, old: str, new: str, name: str) -> Path:
    """A unified diff of tdx.c with `old` replaced by `new`, as a user would write one."""
    before = (tree / TDX_C).read_text()
    assert before.count(old) == 1, old
    after = before.replace(old, new)
    diff = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                f"a/{TDX_C}", f"b/{TDX_C}")
    path = tmp_path / name
    path.write_text("".join(diff))
    return path


# ---------------------------------------------------------------------------
# The kernel's verdicts.


# Linux 7.3 enables TDX only on a module with topology enumeration (1.5.05 on).
TOPOLOGY_MODULES = tuple(m for m in BUNDLED_MODULES if load_profile(m).enumerates_topology)


def test_7_3_does_not_enable_tdx_on_a_module_without_topology_enumeration(tree: Path) -> None:
    """1.5.01 has no TDX_FEATURES0.TOPOLOGY_ENUM: the tree's own bring-up refuses it, so
    verify skips, naming why, and the command line says the same in one line."""
    b = backend(tree, module="1.5.01")
    assert b.seam.bringup_failure is not None
    report = verify(b)
    assert report.skip_reason is not None and not report.checks
    with pytest.raises(KvmError) as e:
        kernel_source_backend(str(tree), (), load_profile("1.5.01"), MAX_HOST)
    assert e.value.skip and "has no topology enumeration" in e.value.reason


@pytest.mark.parametrize("module", TOPOLOGY_MODULES)
def test_upstream_7_3_fails_exactly_the_denylist_bypass(tree: Path, module: str) -> None:
    b = backend(tree, module=module)
    report = verify(b)
    assert failed(report) == BYPASS | WARN
    assert report.knowledge is not None and report.knowledge.policy is not None
    assert report.knowledge.policy.name == "upstream"
    waitpkg = next(c for c in report.checks if c.id == "adversarial_denylist_bypass_waitpkg")
    assert waitpkg.actual.startswith("ACCEPTED")
    # Every TD went back, every kzalloc was freed; the one WARN is init_vm_no_kernel_warn's.
    assert (b.seam.free_key_ids, b.seam.live_allocations, b.seam.warnings) == (16, 0, 1)
    warn = next(c for c in report.checks if c.id == "init_vm_no_kernel_warn")
    assert "malformed leaf 0x1F" in warn.detail and "VM marked bugged" in warn.detail
    assert b.seam.open_fds == ()


@pytest.mark.parametrize("module", TOPOLOGY_MODULES)
def test_the_reconstructed_series_passes_verify_but_for_the_warn(tree: Path, module: str) -> None:
    b = backend(tree, ["rfc-v2"], module=module)
    assert failed(verify(b, "rfc-v2")) == WARN
    auto = verify(b)
    assert failed(auto) == WARN
    assert auto.knowledge is not None and auto.knowledge.policy is not None
    assert auto.knowledge.policy.name == "rfc-v2"


def test_the_patch_table_is_the_bundled_allowlist(tree: Path) -> None:
    """A module that lists every bit of every row the allowlist names: the patched kernel
    reports exactly the allowlist (value registers whole), as the mirror predicts."""
    allow = bundled_allowlist()
    rows = sorted({(leaf, sub) for leaf, sub, _ in allow.allowed}
                  | {(leaf, 0 if sub == ANY else sub) for leaf, sub, _ in VALUE_REGISTERS})
    ones = ["0xffffffff"] * 4
    profile = profile_from_json({
        "name": "every-bit", "base": "2.0",
        "rows": [{"leaf": hex(leaf), "subleaf": None if leaf in (1, 0x80000008) else sub,
                  "config_direct": ones, "allow_direct": ["0"] * 4} for leaf, sub in rows],
    }, "test")
    b = open_backend(tree, ["rfc-v2"], profile, MAX_HOST)
    with Kvm(b.seam) as kvm, kvm.create_td() as td:
        got = td.capabilities_raw(len(rows))
    want = mirror.predict_capabilities(profile, MAX_HOST, get_policy("rfc-v2"), len(rows))
    assert got.errno == 0 and got.data == want.buffer


# ---------------------------------------------------------------------------
# A bug a user introduces is caught.


def test_dropping_the_count_check_is_caught_by_verify(tree: Path, tmp_path: Path) -> None:
    patch = user_patch(tree, tmp_path, COUNT_CHECK, "", "no-count-check.patch")
    b = backend(tree, [str(patch)])
    # Every check whose request leaves an entry on no module row, as the README lists them.
    assert failed(verify(b, "upstream")) == BYPASS | WARN | {
        "init_vm_unlisted_leaf_rejected", "init_vm_nent_256_not_e2big", "init_vm_nent_limits",
        "adversarial_unflagged_multi_match", "adversarial_duplicate_entries",
        "adversarial_matches_prediction", "lifecycle_reinit_after_kvm_refusal"}


def test_the_warn_a_request_can_reach_is_seen(tree: Path) -> None:
    """Linux 7.3: smuggled HLE+RTM on a host without TSX_CTRL make TDH.MNG.INIT fail with a
    non-operand status: -EIO, a WARN, and the VM marked bugged (every later ioctl -EIO).
    The simulated host answers both calls alike and counts the one WARN."""
    host = replace(MAX_HOST, name="no-tsx-ctrl", tsx_ctrl=False)
    b = backend(tree, host=host)
    base = mirror.full_request(b.module, host, get_policy("upstream")).init_vm
    smuggled = InitVm(attributes=base.attributes, xfam=base.xfam, entries=(
        CpuidEntry(7, 1, FLAG_SIGNIFICANT_INDEX), CpuidEntry(7, 2, FLAG_SIGNIFICANT_INDEX),
        CpuidEntry(7, 5, ebx=1 << 4 | 1 << 11),
        *(e for e in base.entries if e.function != 7)))
    with Kvm(b.seam) as kvm, kvm.create_td() as td:
        first = td.init_vm(smuggled)
        again = td.init_vm(base)
    assert (first.errno, first.hw_error) == (errno.EIO, 0)
    assert again.errno == errno.EIO  # a bugged VM, not "already initialised" (-EINVAL)
    assert b.seam.warnings == 1
    assert b.seam.free_key_ids == 16
    prediction = mirror.predict_init_vm(b.module, host, get_policy("upstream"),
                                        Request(init_vm=smuggled))
    assert prediction.same_answer(first)
    simulated = SimulatedHost(b.module, host, get_policy("upstream"))
    with Kvm(simulated) as kvm, kvm.create_td() as td:
        assert td.init_vm(smuggled).same_answer(first)
        assert td.init_vm(base).same_answer(again)
    assert simulated.kernel_warnings == 1


# ---------------------------------------------------------------------------
# The cache.


def test_a_second_open_is_served_from_the_cache(tree: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMTDX_CACHE_DIR", str(tmp_path))
    assert backend(tree).compiled
    b = backend(tree, module="1.5.01")
    assert not b.compiled
    assert b.version == "7.3.4" and "Linux 7.3.4" in b.label
    # A patched tree is another library; the generated C is kept beside each.
    assert backend(tree, ["rfc-v2"]).compiled
    assert len(list((tmp_path / "kernelsrc").glob("tdx-*.so"))) == 2
    assert len(list((tmp_path / "kernelsrc").glob("tdx-*.c"))) == 2


def test_the_bundled_patches() -> None:
    assert "rfc-v2" in bundled_patches()


# ---------------------------------------------------------------------------
# Clear errors.


def _error(tree: Path, patches: list[str] | None = None) -> KernelSourceError:
    with pytest.raises(KernelSourceError) as e:
        backend(tree, patches or [])
    assert "\n" not in str(e.value)
    return e.value


def test_no_compiler_is_exit_4_naming_it(tree: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    copy = copy_tree(tree, tmp_path / "linux")
    (copy / TDX_C).write_text((copy / TDX_C).read_text() + "\n/* not cached */\n")
    monkeypatch.setenv("CC", "no-such-cc")
    err = _error(copy)
    assert err.code == ExitCode.SKIP and "no C compiler (no-such-cc)" in str(err)


def test_a_tree_without_tdx_is_exit_4(tmp_path: Path) -> None:
    (tmp_path / "arch" / "x86" / "kvm").mkdir(parents=True)
    err = _error(tmp_path)
    assert err.code == ExitCode.SKIP and TDX_C in str(err)


def test_not_a_tree_is_exit_2(tmp_path: Path) -> None:
    err = _error(tmp_path)
    assert err.code == ExitCode.USAGE and "not a Linux tree" in str(err)


def test_a_renamed_function_is_named_with_its_file(tree: Path, tmp_path: Path) -> None:
    copy = copy_tree(tree, tmp_path / "linux")
    text = (copy / TDX_C).read_text()
    (copy / TDX_C).write_text(text.replace("static int tdx_get_cmd(", "static int tdx_read_cmd("))
    err = _error(copy)
    assert err.code == ExitCode.USAGE
    assert str(err).startswith(f"tdx_vm_ioctl ({TDX_C}:")
    assert "uses tdx_get_cmd" in str(err)


def test_a_missing_entry_point_is_named(tree: Path, tmp_path: Path) -> None:
    copy = copy_tree(tree, tmp_path / "linux")
    text = (copy / TDX_C).read_text()
    (copy / TDX_C).write_text(text.replace("int tdx_vm_ioctl(", "int tdx_vm_ioctl2("))
    err = _error(copy)
    assert str(err).startswith(f"tdx_vm_ioctl is not defined in {TDX_C}")


def test_a_patch_that_does_not_apply_is_exit_2(tree: Path, tmp_path: Path) -> None:
    patch = user_patch(tree, tmp_path, COUNT_CHECK, "", "p.patch")
    patch.write_text(patch.read_text().replace("copy_cnt != cpuid->nent", "copy_cnt != 0"))
    err = _error(tree, [str(patch)])
    assert err.code == ExitCode.USAGE and "does not apply" in str(err) and "p.patch" in str(err)


def test_an_unknown_patch_name_lists_the_bundled_ones(tree: Path) -> None:
    err = _error(tree, ["rfc-v9"])
    assert err.code == ExitCode.USAGE and "rfc-v2" in str(err)


def test_the_patch_is_marked_reconstructed() -> None:
    from importlib import resources
    text = resources.files("kvmtdx").joinpath("data").joinpath("patches").joinpath(
        "rfc-v2.patch").read_text()
    assert text.startswith("RECONSTRUCTED")
    assert json.loads(resources.files("kvmtdx").joinpath("data").joinpath(
        "allowlist-rfc-v2.json").read_text())["provenance"].startswith("RECONSTRUCTED")

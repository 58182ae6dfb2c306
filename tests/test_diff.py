"""`kvmtdx diff`: two runs, or two policies, bit by bit and by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import bypass_request

from kvmtdx import diff
from kvmtdx.cli import main
from kvmtdx.errors import DataError
from kvmtdx.model.catalog import BitRef
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.report.snapshot import load_snapshot

# Spec section 6: what the series hides on a 2.0 module with every feature present.
SERIES_HIDES = {
    (1, "ecx", 3): "MWAIT", (1, "ecx", 7): "EST", (1, "ecx", 8): "TM2", (1, "ecx", 10): "CID",
    (1, "ecx", 11): "SDBG", (1, "ecx", 14): "XTPR", (1, "ecx", 18): "DCA",
    (1, "edx", 18): "PN", (1, "edx", 22): "ACPI", (1, "edx", 28): "HT", (1, "edx", 29): "ACC",
    (1, "edx", 31): "PBE",
    (7, "ebx", 4): "HLE", (7, "ebx", 11): "RTM", (7, "ebx", 12): "CQM", (7, "ebx", 15): "RDT_A",
    (7, "ecx", 0): "PREFETCHWT1", (7, "ecx", 5): "WAITPKG", (7, "ecx", 13): "TME",
    (7, "edx", 18): "PCONFIG",
    (0x71, "eax", 3): "RAO_INT", (0x71, "eax", 8): "ARCH_PERFMON_EXT",
    (0x71, "edx", 17): "UIRET_UIF_FROM_RFLAGS",
    **{(0x1C, "eax", b): f"LBR_DEPTH_{8 * (b + 1)}" for b in range(8)},
    **{(0x23, "eax", b): f"SUBLEAF_{b}_VALID" for b in range(4)},
}
# Today's kernel already hides these three with its denylist: nothing changes for them.
DENYLIST = {(7, "ebx", 4), (7, "ebx", 11), (7, "ecx", 5)}


def _short(b: BitRef) -> tuple[int, str, int]:
    leaf = 0x71 if (b.leaf, b.subleaf) == (7, 1) else b.leaf
    return (leaf, b.register, b.bit)


def test_policy_diff_upstream_to_rfc_v2_on_2_0_is_the_spec_list() -> None:
    d = diff.diff_policies(load_profile("2.0"), MAX_HOST, get_policy("upstream"),
                           get_policy("rfc-v2"))
    lost = {_short(b): b.name for b in d.no_longer}
    expected = {k: v for k, v in SERIES_HIDES.items() if k not in DENYLIST}
    assert lost == expected
    assert lost[(1, "ecx", 3)] == "MWAIT"
    # CORE_CAPABILITIES is listed by 2.0 and reported by today's kernel as well (its
    # denylist does not touch it), so the series does not newly offer it here: the two
    # policies agree on it, and nothing is newly available.
    assert d.newly == []
    assert not any(b.name == "CORE_CAPABILITIES" for b in d.no_longer)


def test_policy_diff_the_other_way_round_swaps_the_lists() -> None:
    m = load_profile("2.0")
    a = diff.diff_policies(m, MAX_HOST, get_policy("upstream"), get_policy("rfc-v2"))
    b = diff.diff_policies(m, MAX_HOST, get_policy("rfc-v2"), get_policy("upstream"))
    assert a.no_longer == b.newly and a.newly == b.no_longer


def test_policy_diff_core_capabilities_on_1_5_01_is_never_there() -> None:
    d = diff.diff_policies(load_profile("1.5.01"), MAX_HOST, get_policy("upstream"),
                           get_policy("rfc-v2"))
    assert not any(b.name == "CORE_CAPABILITIES" for b in d.no_longer + d.newly)


def test_policy_diff_cli_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "--module", "2.0", "--policy", "upstream", "--policy", "rfc-v2"]) == 1
    out = capsys.readouterr().out
    assert "TDs can no longer be given (32)" in out and "MWAIT" in out
    assert main(["diff", "--module", "2.0", "--policy", "upstream", "--policy", "rfc-v2",
                 "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "policy-diff" and len(doc["no_longer_available"]) == 32
    assert doc["newly_available"] == []
    assert main(["diff", "--module", "2.0", "--policy", "upstream",
                 "--policy", "upstream-6.16"]) == 0


def test_policy_diff_needs_two_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "--module", "2.0", "--policy", "upstream"]) == 2
    assert "--policy given twice" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Files.


def _probe(tmp_path: Path, spec: str, rc: int = 0) -> Path:
    """`probe --simulate SPEC` as a JSON file; `rc`: 1 for a kernel with a probed hazard."""
    path = tmp_path / (spec.replace(":", "_") + ".json")
    assert main(["probe", "--simulate", spec, "--format", "json", "--output", str(path)]) == rc
    return path


def test_diff_of_two_probes_lists_exactly_the_changed_bits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _probe(tmp_path, "2.0:upstream", rc=1), _probe(tmp_path, "2.0:rfc-v2")
    d = diff.diff_files(load_snapshot(str(a)), load_snapshot(str(b)))
    assert (d.verdict_a, d.verdict_b) == ("fail", "pass")  # the lookup traps
    changed = {(c.leaf, c.subleaf, c.register, c.bit): c.name for c in d.changes}
    policy = diff.diff_policies(load_profile("2.0"), MAX_HOST, get_policy("upstream"),
                                get_policy("rfc-v2"))
    assert changed == {(x.leaf, x.subleaf or 0, x.register, x.bit): x.name
                       for x in policy.no_longer}
    mwait = [c for c in d.changes if c.name == "MWAIT"]
    assert {(c.what, c.a, c.b) for c in mwait} == {
        ("reported", "yes", "no"), ("class", "REPORTED_ACCEPTED", "HIDDEN_KVM_REJECTED")}
    capsys.readouterr()
    assert main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    # one per bit, not per fact, and the verdict
    assert "MWAIT" in out and out.endswith("33 differences\n")
    assert main(["diff", str(a), str(a)]) == 0
    assert "no differences" in capsys.readouterr().out


def test_diff_of_a_probe_and_its_mutant_shows_the_hazard(tmp_path: Path) -> None:
    a = _probe(tmp_path, "2.0:rfc-v2")
    b = _probe(tmp_path, "2.0:rfc-v2:allowlist_skips_7_0_edx", rc=1)
    d = diff.diff_files(load_snapshot(str(a)), load_snapshot(str(b)))
    assert [(c.name, c.what, c.a, c.b) for c in d.changes] == [
        ("PCONFIG", "class", "HIDDEN_KVM_REJECTED", "HIDDEN_ACCEPTED")]


def _caps(tmp_path: Path, name: str, entries: list[dict[str, int]], xfam: int = 0x2e7) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"schema": 1, "kind": "caps", "supported_attrs": 0x10000000,
                                "supported_xfam": xfam, "cpuid": entries}))
    return path


def test_diff_of_caps_files_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _caps(tmp_path, "a.json", [{"function": 7, "index": 0, "eax": 0, "ebx": 0x18,
                                    "ecx": 0, "edx": 1 << 30}])
    b = _caps(tmp_path, "b.json", [{"function": 7, "index": 0, "eax": 0, "ebx": 0x8,
                                    "ecx": 0, "edx": 0}], xfam=0x6e7)
    assert main(["diff", str(a), str(b), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    got = {(c["what"], c["name"], c["a"], c["b"]) for c in doc["changes"]}
    assert ("reported", "HLE", "yes", "no") in got
    assert ("reported", "CORE_CAPABILITIES", "yes", "no") in got
    assert any(c[0] == "xfam" and c[2:] == ("no", "yes") for c in got)  # bit 10
    assert doc["differences"] == 3


def test_diff_of_verify_reports_keys_no_subleaf_as_index_0(tmp_path: Path) -> None:
    def verify(status: str) -> dict[str, object]:
        return {"schema": 1, "kind": "verify",
                "checks": [{"id": "invariant_hidden", "status": status,
                            "bits": [{"leaf": "0x1", "subleaf": None, "register": "ecx",
                                      "bit": 3, "name": "MWAIT"}]}]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(verify("pass")))
    b.write_text(json.dumps(verify("fail")))
    d = diff.diff_files(load_snapshot(str(a)), load_snapshot(str(b)))
    assert [(c.leaf, c.subleaf, c.name, c.a, c.b) for c in d.changes] == [
        (1, 0, "MWAIT", "invariant_hidden=pass", "invariant_hidden=fail")]


PROBE_HEAD = '{"schema": 1, "kind": "probe", '
BAD_FILES = [
    (None, "cannot read"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"hello": 1}', "not a kvmtdx report (it has no 'kind' field)"),
    # A file of another kind is refused by its kind, not read for the fields it shares.
    ('{"schema": 1, "kind": "allowlist", "allowed": []}', "a kvmtdx allowlist report; diff reads "
     "probe, verify, caps or predict reports"),
    ('{"schema": 1, "kind": "fuzzing"}', "unknown report kind 'fuzzing'"),
    ('{"schema": 1, "kind": "fuzz"}', "a kvmtdx fuzz report; diff reads probe, verify, caps or "
     "predict reports"),
    ('{"schema": 2, "kind": "caps", "tool_version": "9.0", "cpuid": []}',
     "schema 2, from kvmtdx 9.0"),
    ('{"kind": "caps", "cpuid": []}', "'schema' must be a positive integer"),
    (PROBE_HEAD + '"bits": [{"leaf": "x", "subleaf": 0, "register": "eax", "bit": 1, '
     '"class": "A"}]}', "bits[0].leaf"),
    (PROBE_HEAD + '"bits": [{"leaf": 1, "subleaf": 0, "register": "rax", "bit": 1, '
     '"class": "A"}]}', "bits[0].register"),
    ('{"schema": 1, "kind": "caps", "cpuid": [{"function": 1, "eax": true}]}', "cpuid[0].eax"),
    ('{"schema": 1, "kind": "verify", "checks": {"id": 1}}', "checks: expected a list"),
    ('{"schema": 1, "kind": "predict", "capabilities": null}', "the prediction has none"),
]


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
def test_bad_files_are_one_line_errors_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
        message: str) -> None:
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    good = _caps(tmp_path, "good.json", [])
    assert main(["diff", str(bad), str(good)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err and message in err
    with pytest.raises(DataError):
        load_snapshot(str(bad))


@pytest.mark.parametrize("shape", ["request", "host"])
def test_a_request_or_host_file_is_refused_not_read_as_capabilities(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], shape: str) -> None:
    # Both carry a "cpuid" list, which is all a caps report needs besides its kind.
    doc = bypass_request() if shape == "request" else {
        "name": "mine", "cpuid": [{"leaf": 7, "subleaf": 0, "eax": 0, "ebx": 0x18, "ecx": 0,
                                   "edx": 0}]}
    f = tmp_path / f"{shape}.json"
    f.write_text(json.dumps(doc))
    good = _caps(tmp_path, "good.json", [])
    assert main(["diff", str(f), str(good)]) == 2
    err = capsys.readouterr().err
    assert err == f"kvmtdx: error: {f}: not a kvmtdx report (it has no 'kind' field)\n"


def test_a_predict_report_diffs_as_its_capabilities(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    files = []
    for policy in ("upstream", "rfc-v2"):
        files.append(tmp_path / f"{policy}.json")
        assert main(["predict", "--module", "2.0", "--policy", policy, "--format", "json",
                     "--output", str(files[-1])]) == 0
    d = diff.diff_files(load_snapshot(str(files[0])), load_snapshot(str(files[1])))
    assert (d.a.kind, d.b.kind) == ("predict", "predict")
    reported = {c.name for c in d.changes if c.what == "reported"}
    by_mirror = diff.diff_policies(load_profile("2.0"), MAX_HOST, get_policy("upstream"),
                                   get_policy("rfc-v2"))
    assert reported == {b.name for b in by_mirror.no_longer}


def test_diff_needs_two_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "only-one.json"]) == 2


def test_every_json_report_writes_leaves_as_hex_strings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """probe, diff (files and policies) and verify agree on how a leaf is spelled."""
    import re

    hexleaf = re.compile(r"0x[0-9a-f]+")
    a, b = _probe(tmp_path, "2.0:upstream", rc=1), _probe(tmp_path, "2.0:rfc-v2")
    capsys.readouterr()
    docs = [json.loads(a.read_text())]
    assert main(["diff", str(a), str(b), "--format", "json"]) == 1
    docs.append(json.loads(capsys.readouterr().out))
    assert main(["diff", "--module", "2.0", "--policy", "upstream", "--policy", "rfc-v2",
                 "--format", "json"]) == 1
    docs.append(json.loads(capsys.readouterr().out))
    assert main(["verify", "--simulate", "2.0:upstream", "--format", "json"]) == 1
    docs.append(json.loads(capsys.readouterr().out))

    def leaves(node: object) -> list[object]:
        if isinstance(node, dict):
            own = [node["leaf"]] if "leaf" in node else []
            return own + [x for v in node.values() for x in leaves(v)]
        if isinstance(node, list):
            return [x for v in node for x in leaves(v)]
        return []

    for doc in docs:
        found = leaves(doc)
        assert found, doc.get("kind")
        bad = [x for x in found if not (isinstance(x, str) and hexleaf.fullmatch(x))]
        assert not bad, f"{doc.get('kind')}: leaves not written as hex strings: {bad[:5]}"


# ---------------------------------------------------------------------------
# Verify reports: check statuses, not only the bits both name.


def _verify_doc(verdict: str, checks: dict[str, str]) -> dict[str, object]:
    return {"schema": 1, "kind": "verify", "verdict": verdict,
            "checks": [{"id": cid, "group": "capabilities", "status": status, "detail": "",
                        "bits": []} for cid, status in checks.items()]}


def test_diff_of_verify_reports_names_every_check_status_change(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_verify_doc("pass", {"kept": "pass", "broke": "pass",
                                                 "healed": "fail", "gone": "pass"})))
    b.write_text(json.dumps(_verify_doc("fail", {"kept": "pass", "broke": "fail",
                                                 "healed": "pass", "new": "skip"})))
    d = diff.diff_files(load_snapshot(str(a)), load_snapshot(str(b)))
    assert [(c.id, c.a, c.b) for c in d.checks] == [
        ("broke", "pass", "fail"), ("healed", "fail", "pass"), ("gone", "pass", "absent"),
        ("new", "absent", "skip")]
    assert (d.verdict_a, d.verdict_b) == ("pass", "fail")
    assert d.count == 5  # four checks and the verdict
    assert main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "verdict" in out and "pass -> fail" in out
    assert "check broke" in out and "check healed" in out and "fail -> pass" in out
    assert "check new" in out and "absent -> skip" in out
    assert main(["diff", str(a), str(b), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == {"a": "pass", "b": "fail"}
    assert {(c["id"], c["a"], c["b"]) for c in doc["checks"]} == {
        ("broke", "pass", "fail"), ("healed", "fail", "pass"), ("gone", "pass", "absent"),
        ("new", "absent", "skip")}
    assert doc["differences"] == 5
    assert main(["diff", str(b), str(b)]) == 0


def test_diff_of_a_passing_and_a_failing_verify_run_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The failing checks of flags_unchecked name no bit: the diff must still see them.

    Module 1.5.01, whose missing leaf 0x1F keeps the WARN check from failing, is the one
    on which the simulated rfc-v2 kernel passes."""
    files = []
    for spec, rc in (("1.5.01:rfc-v2", 0), ("1.5.01:rfc-v2:flags_unchecked", 1)):
        files.append(tmp_path / f"{spec.replace(':', '_')}.json")
        assert main(["verify", "--simulate", spec, "--format", "json",
                     "--output", str(files[-1])]) == rc
    capsys.readouterr()
    assert main(["diff", *map(str, files)]) == 1
    out = capsys.readouterr().out
    assert "check caps_flags_rejected" in out and "check init_vm_flags_rejected" in out
    assert "no differences" not in out

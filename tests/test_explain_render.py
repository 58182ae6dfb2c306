"""explain's JSON for tools (the project's envelope, plain values) and its text for people;
the command's inputs and exit codes."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import kvmtdx
from kvmtdx.cli import main
from kvmtdx.errors import ExitCode
from kvmtdx.explain import explain, host_check, read_input, render
from kvmtdx.model.policy import get_policy
from kvmtdx.model.profiles import MAX_HOST, load_profile
from kvmtdx.model.requests import Request, request_from_json
from kvmtdx.session import simulated_backend
from kvmtdx.sim import SimulatedHost

REQUEST = {"attributes": "0x10000000", "xfam": "0x3", "cpuid": [
    {"function": "0x7", "index": 0, "flags": 1, "ecx": "0x20"},
    {"function": "0x80000008", "index": 0, "flags": 0, "eax": "0x300000"}]}


def test_json_has_the_envelope_and_decodes_the_status() -> None:
    e = explain([read_input("0xc000010000000045")])
    data = json.loads(json.dumps(render.explanation_json(e)))
    assert (data["schema"], data["kind"], data["tool_version"]) == (1, "explain",
                                                                    kvmtdx.__version__)
    [f] = data["findings"]
    assert f["value"] == "0xc000010000000045" and f["kind"] == "status"
    s = f["status"]
    assert s["operand"]["name"] == "CPUID_CONFIG" and s["class"]["id"] == 1
    assert s["kvm"] == {**s["kvm"], "errno": "EINVAL", "status_in_hw_error": True,
                        "warn": False}
    assert data["diagnosis"] is None and data["unrecognised"] == []


def test_json_of_a_diagnosis_lists_every_fault_with_bits_and_fixes() -> None:
    backend = simulated_backend(load_profile("2.0"), MAX_HOST, get_policy("upstream"))
    e = explain([], request=request_from_json(REQUEST, "r"), backend=backend)
    data = render.explanation_json(e)
    d = data["diagnosis"]
    assert d["outcome"]["outcome"] == "KVM_REJECTED" and d["final"]["outcome"] == "ACCEPTED"
    [fault] = d["faults"]
    assert fault["category"] == "hidden_by_policy" and fault["decider"] == "kvm"
    assert fault["bits"] == [{"leaf": "0x7", "subleaf": 0, "register": "ecx", "bit": 5,
                              "name": "WAITPKG", "qemu": "waitpkg"}]
    assert data["observed"]["outcome"] == "KVM_REJECTED"
    assert "QEMU 10.0.13" in d["qemu_names"]


def test_host_check_json() -> None:
    h = host_check.run(simulated_backend(load_profile("2.0"), MAX_HOST, get_policy("upstream")))
    data = render.host_check_json(h)
    assert data["kind"] == "explain" and data["schema"] == 1
    hc = data["host_check"]
    assert hc["wanted"] == hc["available"] + len(hc["missing"])
    hle = [m for m in hc["missing"] if m["qemu"] == "hle"]
    assert hle and hle[0]["cause"] == "kvm_hides" and hle[0]["leaf"] == "0x7"


def test_text_shows_each_line_once_and_repeats_as_references() -> None:
    log = ("qemu: TDX ioctl KVM_TDX_INIT_VM failed, hw_errors: 0xc000010000000045: "
           "Invalid argument\n") * 2
    text = render.explanation_text(explain([read_input("-", io.StringIO(log))]))
    assert text.count("#1 EINVAL (22) from KVM_TDX_INIT_VM") == 1
    assert text.count("#2 0xc000010000000045: TDX_OPERAND_INVALID") == 1
    assert text.count("the same as #1 above") == 1 and text.count("the same as #2 above") == 1


def run(argv: list[str], stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            code = main(["explain", *argv])
    finally:
        sys.stdin = saved
    return code, out.getvalue()


def test_exit_1_when_nothing_is_recognised() -> None:
    code, text = run(["-"], "all quiet\n")
    assert code == ExitCode.FAIL and "-: no TDX status, errno or feature warning" in text


def test_output_file_is_written(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    code, text = run(["EIO", "--format", "json", "--output", str(target)])
    assert code == ExitCode.PASS and text == ""
    assert json.loads(target.read_text())["findings"][0]["errno"]["errno"] == "EIO"


@pytest.mark.parametrize("argv, message", [
    ([], "needs a STATUS"),
    (["--host-check", "EIO"], "takes no STATUS"),
    (["-", "-"], "once"),
    (["--request", "nope.json"], "nope.json"),
])
def test_usage_errors_are_one_line_and_exit_2(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(argv)
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert err.startswith("kvmtdx: error: ") and message in err and err.count("\n") == 1


def test_a_request_without_a_model_is_refused(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    req = tmp_path / "r.json"
    req.write_text(json.dumps(REQUEST))
    code, _ = run(["--request", str(req)])
    assert code == ExitCode.USAGE and "needs a model" in capsys.readouterr().err


def test_module_alone_replays_against_the_upstream_kernel(tmp_path: Path) -> None:
    req = tmp_path / "r.json"
    req.write_text(json.dumps(REQUEST))
    code, text = run(["--request", str(req), "--module", "2.0"])
    assert code == ExitCode.PASS
    assert "policy upstream (given)" in text and "drop +waitpkg" in text
    code, text = run(["--request", str(req), "--module", "2.0", "--policy", "rfc-v2"])
    assert "allowlist" in text and "drop +waitpkg" in text


THIS = __name__


def rfc_kernel() -> SimulatedHost:
    """A plug-in seam, loaded the way a user's is: a kernel with the series on module 2.0."""
    return SimulatedHost(load_profile("2.0"), MAX_HOST, get_policy("rfc-v2"))


def test_a_plug_in_backend_chooses_the_policy_from_its_capabilities(tmp_path: Path) -> None:
    req = tmp_path / "r.json"
    req.write_text(json.dumps(REQUEST))
    code, text = run(["--request", str(req), "--backend", f"{THIS}:rfc_kernel",
                      "--module", "2.0", "--policy", "auto", "--format", "json"])
    data = json.loads(text)
    assert code == ExitCode.PASS
    assert data["model"]["policy"] == "rfc-v2"
    assert data["diagnosis"]["faults"][0]["check"] == "allowlist"
    assert data["observed"]["outcome"] == data["diagnosis"]["outcome"]["outcome"]
    assert data["backend"] == f"backend {THIS}:rfc_kernel"


def test_a_qemu_feature_warning_without_a_model_still_says_what_qemu_knows() -> None:
    line = ("qemu-system-x86_64: warning: TDX doesn't support requested feature: "
            "CPUID.07H:EDX.avx512-fp16 [bit 23]")
    [item] = explain([read_input("-", io.StringIO(line))]).items
    assert item.bit is not None and item.bit.qemu == "avx512-fp16" and item.bit.subleaf == 0
    assert item.facts == ("a TD gets it from the CPU, not from its CPUID configuration, with "
                          "XFAM bit 5 (AVX512_OPMASK; QEMU: +avx512f)",)


def _replayed(edx: int = 0, leaf1_ecx: int = 0) -> Request:
    return request_from_json({"attributes": "0x10000000", "xfam": "0x3", "cpuid": [
        {"function": "0x7", "index": 0, "flags": 1, "edx": hex(edx)},
        {"function": "0x1", "index": 0, "flags": 0, "ecx": hex(leaf1_ecx)},
        {"function": "0x80000008", "index": 0, "flags": 0, "eax": "0x300000"}]}, "r")


def test_faults_of_one_rule_in_one_register_are_told_as_one_with_every_bit() -> None:
    e = explain([], request=_replayed(edx=0b11), module=load_profile("2.0"),
                policy=get_policy("upstream"))
    text = render.explanation_text(e)
    assert "faults     2 (3 replays)" in text
    assert "  1. not configurable on this module" in text and "  2. " not in text
    assert "fix        drop 0x7.0 EDX[0] bit0, 0x7.0 EDX[1] SGX_KEYS" in text


def test_a_backend_that_answers_otherwise_than_the_model_is_said_so() -> None:
    # Judged by the upstream kernel, run on one with the series: MONITOR is refused there.
    module = load_profile("2.0")
    e = explain([], request=_replayed(leaf1_ecx=1 << 3), module=module,
                policy=get_policy("upstream"),
                backend=simulated_backend(module, MAX_HOST, get_policy("rfc-v2")))
    text = render.explanation_text(e)
    assert "no fault: the request is accepted" in text
    assert text.rstrip().endswith("KVM_REJECTED -EINVAL (NOT as predicted)")


def test_a_simulated_backend_lends_its_host_to_the_model() -> None:
    host = replace(MAX_HOST, name="no-5-level-ept", ept_5level=False)
    backend = simulated_backend(load_profile("2.0"), host, get_policy("upstream"))
    e = explain([], request=_replayed(), backend=backend)
    assert e.model is not None and e.model.host.name == "no-5-level-ept"
    assert e.model.source == "the simulated host"

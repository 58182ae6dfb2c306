#!/usr/bin/env python3
"""Convert QEMU's x86 CPUID feature names into kvmtdx/data/qemu-cpu-features.json.

Reads a QEMU source tree: `target/i386/cpu.c` (the `feature_word_info[]`
table: which CPUID leaf, sub-leaf and register each feature word is, and the
name of every bit, as users type it after -cpu; and `x86_ext_save_areas[]`:
which feature enables each XSAVE state component) and `target/i386/cpu.h`
(the CPUID_* and XSTATE_* bit macros).  Only facts are carried over (names
and bit positions), with the source named in the output.

    scripts/convert-qemu-features QEMU_TREE [--commit SHA] [--origin TEXT] \
        [--note TEXT] > kvmtdx/data/qemu-cpu-features.json

The commit is read with git when the tree is a git checkout; --commit names
it for a tree unpacked from a release tarball.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REGISTERS = {"R_EAX": "eax", "R_EBX": "ebx", "R_ECX": "ecx", "R_EDX": "edx"}


class ConvertError(Exception):
    pass


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def braced(text: str, start: int) -> tuple[str, int]:
    """The text inside the brace pair opening at or after `start`, and the index after it."""
    open_at = text.index("{", start)
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i], i + 1
    raise ConvertError("unbalanced braces")


def entries(body: str) -> list[tuple[str, str]]:
    """`[KEY] = { ... }` items of a designated-initialiser array body."""
    out: list[tuple[str, str]] = []
    pos = 0
    pattern = re.compile(r"\[\s*(\w+)\s*\]\s*=\s*\{")
    while True:
        m = pattern.search(body, pos)
        if m is None:
            return out
        inner, pos = braced(body, m.end() - 1)
        out.append((m.group(1), inner))


def macros(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in re.finditer(r"^#define\s+(\w+)\s+(.+?)\s*$", strip_comments(header), flags=re.M):
        out[m.group(1)] = m.group(2)
    return out


def evaluate(expr: str, defs: dict[str, str], depth: int = 0) -> int:
    """A C integer expression of literals, shifts, ORs and macros from `defs`."""
    if depth > 8:
        raise ConvertError(f"macro nesting too deep in {expr!r}")

    def expand(m: re.Match[str]) -> str:
        name = m.group(0)
        if name in defs:
            return f"({evaluate(defs[name], defs, depth + 1)})"
        raise ConvertError(f"unknown macro {name}")

    py = re.sub(r"(?<=[0-9a-fA-Fx])(ULL|UL|ull|ul|U|u|LL|L)\b", "", expr)
    py = re.sub(r"\b[A-Za-z_]\w*\b", expand, py)
    if not re.fullmatch(r"[0-9a-fA-FxX()<>|&~ +\-]*", py):
        raise ConvertError(f"cannot evaluate {expr!r}")
    value = eval(py, {"__builtins__": {}})  # digits and operators only, checked above
    if not isinstance(value, int):
        raise ConvertError(f"{expr!r} is not an integer")
    return value


def feat_names(inner: str) -> dict[int, str]:
    m = re.search(r"\.feat_names\s*=\s*\{", inner)
    if m is None:
        return {}
    body, _ = braced(inner, m.end() - 1)
    names: dict[int, str] = {}
    index = 0
    for item in (x.strip() for x in body.split(",")):
        if not item:
            continue
        d = re.fullmatch(r"\[\s*(\d+)\s*\]\s*=\s*(.+)", item)
        if d:
            index, item = int(d.group(1)), d.group(2).strip()
        s = re.fullmatch(r'"([^"]*)"', item)
        if s:
            names[index] = s.group(1)
        elif item != "NULL":
            raise ConvertError(f"unexpected feat_names item {item!r}")
        index += 1
    return names


def cpuid_of(inner: str, defs: dict[str, str]) -> tuple[int, int | None, str] | None:
    m = re.search(r"\.cpuid\s*=\s*\{", inner)
    if m is None:
        return None
    body, _ = braced(inner, m.end() - 1)
    fields = dict(re.findall(r"\.(\w+)\s*=\s*([^,]+)", body))
    leaf = evaluate(fields["eax"].strip(), defs)
    needs_ecx = fields.get("needs_ecx", "false").strip() == "true"
    subleaf = evaluate(fields.get("ecx", "0").strip(), defs) if needs_ecx else None
    reg = REGISTERS[fields["reg"].strip()]
    return leaf, subleaf, reg


def feature_words(cpu_c: str, defs: dict[str, str]) -> dict[str, dict[str, Any]]:
    start = cpu_c.index("feature_word_info[FEATURE_WORDS]")
    body, _ = braced(cpu_c, start)
    words: dict[str, dict[str, Any]] = {}
    for key, inner in entries(body):
        if "CPUID_FEATURE_WORD" not in inner:
            continue  # MSR feature words: not CPUID
        where = cpuid_of(inner, defs)
        if where is None:
            raise ConvertError(f"{key}: a CPUID feature word without .cpuid")
        leaf, subleaf, reg = where
        words[key] = {"word": key, "leaf": f"0x{leaf:x}", "subleaf": subleaf, "register": reg,
                      "bits": {str(b): n for b, n in sorted(feat_names(inner).items())}}
    return words


def xsave_components(cpu_c: str, defs: dict[str, str],
                     words: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    start = cpu_c.index("x86_ext_save_areas[")
    body, _ = braced(cpu_c, start)
    out: list[dict[str, Any]] = []
    for key, inner in entries(body):
        fields = dict(re.findall(r"\.(feature|bits)\s*=\s*(\w+)", inner))
        word = words[fields["feature"]]
        mask = evaluate(fields["bits"], defs)
        bit = mask.bit_length() - 1
        out.append({"xfam_bit": evaluate(key, defs), "component": key,
                    "leaf": word["leaf"], "subleaf": word["subleaf"],
                    "register": word["register"], "bit": bit,
                    "feature": word["bits"].get(str(bit))})
    return sorted(out, key=lambda c: int(c["xfam_bit"]))


def git_commit(tree: Path) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"],
                             capture_output=True, text=True, check=False)
    except OSError:
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def convert(tree: Path, commit: str | None, origin: str | None, note: str | None) -> Any:
    cpu_c_path = tree / "target" / "i386" / "cpu.c"
    try:
        raw = cpu_c_path.read_bytes()
        cpu_h = (tree / "target" / "i386" / "cpu.h").read_text()
    except OSError as e:
        raise ConvertError(f"{tree}: not a QEMU source tree: {e.strerror}: {e.filename}") from None
    cpu_c = strip_comments(raw.decode())
    defs = macros(cpu_h)
    defs.setdefault("KVM_CPUID_FEATURES", "0x40000001")  # include/standard-headers kvm_para.h
    words = feature_words(cpu_c, defs)
    version_file = tree / "VERSION"
    version = version_file.read_text().strip() if version_file.is_file() else None
    source: dict[str, Any] = {
        "project": "QEMU", "version": version, "commit": commit or git_commit(tree),
        "file": "target/i386/cpu.c (feature_word_info, x86_ext_save_areas)",
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    if origin:
        source["origin"] = origin
    if note:
        source["note"] = note
    return {
        "schema": 1,
        "about": "QEMU's names for x86 CPUID feature bits (what a user types after -cpu, "
                 "e.g. +avx512-fp16) per leaf, sub-leaf (null: the leaf has none) and "
                 "register; and which feature enables each XSAVE state component (the "
                 "XFAM bits QEMU asks a TD for). Generated by scripts/convert-qemu-features.",
        "source": source,
        "features": sorted(words.values(), key=lambda w: (int(w["leaf"], 16),
                                                          w["subleaf"] or 0, w["register"])),
        "xsave_components": xsave_components(cpu_c, defs, words),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tree", type=Path, help="a QEMU source tree")
    p.add_argument("--commit", help="the QEMU commit the tree is (default: git rev-parse)")
    p.add_argument("--origin", help="where the tree came from, for the record")
    p.add_argument("--note", help="anything else the data file should say about its source")
    args = p.parse_args()
    try:
        data = convert(args.tree, args.commit, args.origin, args.note)
    except (ConvertError, KeyError, ValueError) as e:
        sys.stderr.write(f"convert-qemu-features: {e}\n")
        return 1
    json.dump(data, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark: the mirror's KVM_TDX_INIT_VM predictions per second, per module and policy.

Three request mixes (scripts/workload.py): "verify", what verify and probe ask (the full
and minimal requests, every single bit of every reported row, the lookup traps, legal
encodings); "flips", the full request with each of its bits toggled in turn; and "fuzz",
seeded mutations of the full request as the cross-check draws them.  Each is timed with

- compiled: `mirror.predict_init_vm`, from the model compiled once per (module, host,
  policy) (kvmtdx.model.compiled); its first round (its memos filling) is shown as "cold";
- straight: the straightforward path (`mirror.init_vm_prediction` without detail: KVM's
  checks row by row, TDH.MNG.INIT by the module model, remembered per TD_PARAMS), which
  is what predict_init_vm ran before the compiled model;
- old: with --baseline TREE, an older checkout's own mirror (e.g. one made with `git
  worktree add DIR d8fca8c`, the mirror before the module model), run in a child process
  on the same requests in the same run, since these machines are noisy.

Prints per line the requests and their outcomes by kind (compiled and straightforward must
agree: a difference is reported and fails the run), seconds and predictions per second
(the best of --rounds rounds), and the speed-up; then what compiling each model cost.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import run_in_tree
from workload import flip_requests, fuzz_requests, verify_requests

from kvmtdx.model import mirror
from kvmtdx.model.compiled import CompiledModel
from kvmtdx.model.policy import POLICY_NAMES, Policy, get_policy
from kvmtdx.model.profiles import BUNDLED_MODULES, MAX_HOST, ModuleProfile, load_profile
from kvmtdx.model.requests import Request, request_from_json, request_to_json
from kvmtdx.outcome import Outcome

# Runs in the baseline tree (after baseline.PREAMBLE): its own mirror on the requests.
OLD_DRIVER = r"""
import copy
try:
    from kvmtdx.model import mirror
    from kvmtdx.model.policy import get_policy
    from kvmtdx.model.profiles import MAX_HOST, load_profile
    from kvmtdx.model.requests import request_from_json
except ImportError:
    from kvmtdx import mirror
    from kvmtdx.policy import get_policy
    from kvmtdx.profiles import MAX_HOST, load_profile
    from kvmtdx.requests import request_from_json
module, policy = load_profile(job["module"]), get_policy(job["policy"])
requests = [request_from_json(r, "request") for r in job["requests"]]
times, kinds = [], Counter()
for _ in range(job["rounds"]):
    # New objects each round, as `timed` gives the tree under test: a memo keyed by
    # identity must not carry over from one round to the next on one side only.
    batch = copy.deepcopy(requests)
    kinds.clear()
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    for r in batch:
        kinds[mirror.predict_init_vm(module, MAX_HOST, policy, r).kind.value] += 1
    times.append(time.perf_counter() - t0)
    gc.enable()
print(json.dumps({"times": times, "kinds": kinds}))
"""


def timed(predict: Callable[[Request], Outcome], requests: list[Request], rounds: int
          ) -> tuple[list[float], Counter[str], list[Outcome]]:
    """Seconds per round, the outcome kinds, and the outcomes (of the last round).

    Each round gets the requests as new objects (equal values, the same sharing between
    requests), so nothing remembered by identity carries over from a round to the next."""
    times: list[float] = []
    out: list[Outcome] = []
    for _ in range(rounds):
        batch = copy.deepcopy(requests)
        with no_gc():
            t0 = time.perf_counter()
            out = [predict(r) for r in batch]
            times.append(time.perf_counter() - t0)
    return times, Counter(o.kind.value for o in out), out


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The garbage collector off while the clock runs, as timeit has it: a full collection
    walks every object the benchmark itself holds (thousands of requests), which says
    nothing about the mirror."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def old_run(tree: Path, module: str, policy: str, requests: list[Request], rounds: int
            ) -> tuple[list[float], Counter[str]] | str:
    """The baseline tree's mirror on `requests`: seconds per round and outcome kinds, or why
    it could not run."""
    doc = run_in_tree(tree, OLD_DRIVER, {
        "module": module, "policy": policy, "rounds": rounds,
        "requests": [request_to_json(r) for r in requests]})
    if isinstance(doc, str):
        return doc
    return doc["times"], Counter(doc["kinds"])


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>9,.0f}" if seconds > 0 else "      inf"


def tally(kinds: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))


def bench(module: ModuleProfile, policy: Policy, name: str, requests: list[Request],
          args: argparse.Namespace) -> bool:
    """One line: the three implementations on one mix.  False when they disagree."""
    if args.baseline is not None:
        # The baseline child reads the requests from JSON: no entry object shared between
        # requests.  Both sides get them so, or memos keyed by identity favour this side.
        requests = [request_from_json(request_to_json(r), "request") for r in requests]
    new_t, new_k, new_out = timed(
        lambda r: mirror.predict_init_vm(module, MAX_HOST, policy, r), requests, args.rounds)
    ref_t, _, ref_out = timed(
        lambda r: mirror.init_vm_prediction(module, MAX_HOST, policy, r, detail=False).outcome,
        requests, args.rounds)
    n = len(requests)
    line = (f"{module.name:8} {policy.name:14} {name:7} {n:8,}  {rate(n, min(new_t))}/s "
            f"(cold {rate(n, new_t[0]).strip()})  straight {rate(n, min(ref_t))}/s "
            f"x{min(ref_t) / min(new_t):5.1f}")
    if args.baseline is not None:
        old = old_run(args.baseline, module.name, policy.name, requests, args.rounds)
        if isinstance(old, str):
            line += f"  old: {old}"
        else:
            line += f"  old {rate(n, min(old[0]))}/s x{min(old[0]) / min(new_t):5.1f}"
            if old[1] != new_k:
                line += f" (old outcomes: {tally(old[1])})"
    print(line)
    print(f"{'':40}outcomes: {tally(new_k)}")
    wrong = sum(a != b for a, b in zip(new_out, ref_out, strict=True))
    if wrong:
        print(f"  MISMATCH: {wrong} of {n} outcomes differ from the straightforward path",
              file=sys.stderr)
    return not wrong


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", action="append", help="bundled module(s) (default: 2.0)")
    p.add_argument("--policy", action="append", choices=POLICY_NAMES,
                   help="policies (default: all)")
    p.add_argument("--fuzz", type=int, default=5000, help="fuzz requests per line (5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fuzz mix (0)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the best is shown (3)")
    p.add_argument("--baseline", type=Path, metavar="TREE",
                   help="also time this checkout's own mirror (an older commit's tree)")
    args = p.parse_args()
    if args.baseline is not None and not args.baseline.is_dir():
        p.error(f"--baseline {args.baseline}: not a directory")
    print(f"host {MAX_HOST.name}; predictions per second, best of {args.rounds} rounds")
    ok = True
    compile_times: list[str] = []
    for name in args.module or ["2.0"]:
        if name not in BUNDLED_MODULES and name not in ("1.5.05", "2.0.08"):
            p.error(f"--module {name}: use one of {', '.join(BUNDLED_MODULES)}")
        module = load_profile(name)
        for pol in args.policy or POLICY_NAMES:
            policy = get_policy(pol)
            t0 = time.perf_counter()
            CompiledModel(module, MAX_HOST, policy)
            compile_times.append(f"{name}/{pol} {(time.perf_counter() - t0) * 1e3:.2f} ms")
            mixes = (("verify", verify_requests(module, MAX_HOST, policy)),
                     ("flips", flip_requests(module, MAX_HOST, policy)),
                     ("fuzz", fuzz_requests(module, MAX_HOST, policy, args.fuzz, args.seed)))
            for mix, requests in mixes:
                ok = bench(module, policy, mix, requests, args) and ok
    print("compiling a model (warm module and host tables): " + ", ".join(compile_times))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

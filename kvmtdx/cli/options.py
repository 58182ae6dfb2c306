"""Which options act only in company: the table, and the check that refuses the rest.

An option that a command line would silently ignore is refused (exit 2) before
anything runs, in one line saying what it needs: a user who gave --allowlist to a
policy without one, or --host to a real device in a command that only simulates
with it, believes they changed something.  One row per (option, commands) pair;
tests/test_cli_options.py holds one command line per row on each side of it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvmtdx.errors import DataError


@dataclass(frozen=True)
class Rule:
    """`option` acts in `commands` only when `acts(args)`; else it is refused: `needs`."""

    option: str
    commands: tuple[str, ...]
    acts: Callable[[argparse.Namespace], bool]
    needs: str

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


def _simulated(args: argparse.Namespace) -> bool:
    return args.simulate is not None or getattr(args, "kernel_source", None) is not None


def _policy_diff(args: argparse.Namespace) -> bool:
    return bool(args.module or args.policy)


def _saving(args: argparse.Namespace) -> bool:
    return args.save_module is not None


def _has_allowlist(policies: Iterable[str]) -> bool:
    from kvmtdx.model.policy import get_policy

    return any(get_policy(p).allowlist is not None for p in policies)


def _simulated_policy(args: argparse.Namespace) -> list[str]:
    from kvmtdx.session import parse_simulate

    return [parse_simulate(args.simulate).policy] if args.simulate is not None else []


def _allowlist_acts(args: argparse.Namespace) -> bool:
    """Whether some policy of the run takes the --allowlist table: the simulated kernel's,
    the one judged by (`auto` may choose one that does), the one saved or predicted."""
    if args.command in ("verify", "probe", "fuzz", "td-cpuid"):
        if args.policy == "auto":
            return True
        return _has_allowlist([*_simulated_policy(args), args.policy])
    if args.command == "caps":
        return _has_allowlist([*_simulated_policy(args), *([args.policy] if _saving(args)
                                                            else [])])
    if args.command == "init-vm":
        return _has_allowlist(_simulated_policy(args))
    if args.command == "diff":
        return _policy_diff(args) and _has_allowlist(args.policy or [])
    return _has_allowlist([args.policy])  # predict


_ALLOWLIST_NEEDS = ("a kernel policy with an allowlist (--policy rfc-v2, or --simulate "
                    "MODULE:rfc-v2); the others have none to replace")

RULES: tuple[Rule, ...] = (
    Rule("--host", ("info", "caps", "init-vm"), _simulated,
         "--simulate or --kernel-source: it is the simulated host's CPU, and a real device "
         "has its own"),
    Rule("--host", ("diff",), _policy_diff,
         "--module and --policy: reports carry the host they were made on"),
    Rule("--allowlist", ("diff",), _policy_diff,
         "--module and --policy: reports carry the allowlist they were judged by"),
    Rule("--allowlist", ("predict", "init-vm", "caps", "verify", "probe", "fuzz", "diff",
                         "td-cpuid"),
         _allowlist_acts, _ALLOWLIST_NEEDS),
    Rule("--module", ("caps",), _saving,
         "--save-module: it fills the bits the policy hides from that module's table"),
    Rule("--policy", ("caps",), _saving,
         "--save-module: it says which bits the running kernel hides"),
)


def check(args: argparse.Namespace) -> None:
    """DataError (exit 2) for the first option on the command line that would do nothing."""
    for rule in RULES:
        if args.command in rule.commands and getattr(args, rule.dest, None) is not None \
                and not rule.acts(args):
            raise DataError(f"{rule.option} has no effect here: kvmtdx {args.command} uses it "
                            f"only with {rule.needs}")


def positive_int(text: str) -> int:
    """An argparse type for a count that must be above 0 (TDs, jobs): bad input is a usage
    error (exit 2) named by argparse with its option, before any work starts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be above 0")
    return value

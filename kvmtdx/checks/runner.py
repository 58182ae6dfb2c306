"""Running the suite: open KVM, find TDX, read the capabilities, complete what is known, run
every check (the hygiene ones once the KVM handle is closed) and count.  Nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import psutil

from kvmtdx.checks.context import Context, ProcessNumbers
from kvmtdx.checks.registry import CheckSpec, Skip, Verdict, bad, registered, skip
from kvmtdx.checks.result import CheckResult, Summary, VerifyReport
from kvmtdx.device import Counters, Kvm, Seam, availability
from kvmtdx.errors import KvmError
from kvmtdx.kmsg import KernelLog, LogUnreadable
from kvmtdx.knowledge import Given, complete
from kvmtdx.session import free_key_ids, kernel_warnings
from kvmtdx.structs import Capabilities
from kvmtdx.verdict import Status

Progress = Callable[[int, int, int], None]  # checks done, total, TDs created


def _proc_numbers() -> tuple[int, int]:
    p = psutil.Process()
    return p.num_fds(), int(p.memory_info().rss)


def _empty_summary(fds: int, rss: int, counters: Counters | None = None) -> Summary:
    c = counters or Counters()
    return Summary(0, 0, 0, 0, c.tds_created, c.ioctls, c.init_vm_calls, fds, fds, rss, rss)


@dataclass
class _Start:
    """What the run knows before the first check: the report so far, for an early exit."""

    label: str
    fds: int
    rss: int

    def skipped(self, reason: str, counters: Counters | None = None) -> VerifyReport:
        """TDX is not present: the whole suite skips."""
        return VerifyReport(self.label, None, (), _empty_summary(self.fds, self.rss, counters),
                            skip_reason=reason)

    def failed(self, reason: str, counters: Counters | None = None) -> VerifyReport:
        """TDX should be here but the device would not get that far: tdx_available fails."""
        r = CheckResult("tdx_available", "availability", Status.FAIL, reason)
        s = _empty_summary(self.fds, self.rss, counters)
        return VerifyReport(self.label, None, (r,), replace(s, total=1, failed=1))


def _capabilities(kvm: Kvm, start: _Start) -> Capabilities | VerifyReport:
    """The capabilities of a first TD, or the report of why the suite cannot run."""
    status = availability(kvm)
    if not status.available:
        return (start.skipped if status.skip else start.failed)(status.reason, kvm.counters)
    try:
        with kvm.create_td() as first:
            return first.capabilities()
    except OSError as e:
        return start.failed(f"KVM_TDX_CAPABILITIES failed: {e}", kvm.counters)


class _Ticker:
    """Checks done out of the total, reported after each check and on each new TD."""

    def __init__(self, total: int, counters: Counters, progress: Progress | None) -> None:
        self.done = 0
        self.total = total
        self._counters = counters
        self._progress = progress

    def show(self) -> None:
        if self._progress is not None:
            self._progress(self.done, self.total, self._counters.tds_created)

    def tick(self) -> None:
        self.done += 1
        self.show()


def _run_one(s: CheckSpec, ctx: Context) -> CheckResult:
    start = time.monotonic()
    try:
        v: Verdict = s.fn(ctx)
    except Skip as e:
        v = skip(e.reason)
    except OSError as e:
        v = bad(f"{type(e).__name__}: {e}")
    except KvmError as e:
        v = bad(e.reason)
    return CheckResult(s.id, s.group, v.status, v.detail, v.expected, v.actual, v.bits,
                       v.request, v.request_note, time.monotonic() - start)


def _run_all(specs: Iterable[CheckSpec], ctx: Context, ticker: _Ticker,
             record: list[CheckResult] | None = None) -> list[CheckResult]:
    out = []
    for s in specs:
        out.append(_run_one(s, ctx))
        if record is not None:
            record.append(out[-1])
        ticker.tick()
    return out


def _summary(results: Sequence[CheckResult], c: Counters, proc: ProcessNumbers) -> Summary:
    return Summary(
        total=len(results),
        passed=sum(r.status == Status.PASS for r in results),
        failed=sum(r.status == Status.FAIL for r in results),
        skipped=sum(r.status == Status.SKIP for r in results),
        info=sum(r.status == Status.INFO for r in results),
        tds_created=c.tds_created, ioctls=c.ioctls, init_vm_calls=c.init_vm_calls,
        fds_before=proc.fds_before, fds_after=proc.fds_after,
        rss_before=proc.rss_before, rss_after=proc.rss_after,
    )


def _log_start(ctx: Context) -> None:
    """Where the kernel log stood when the run started, for a real kernel whose WARNs a
    check may provoke (a backend that counts its WARNs needs no log)."""
    if not ctx.allow_kernel_warn or kernel_warnings(ctx.seam) is not None:
        return
    try:
        ctx.log_start = ctx.kernel_log.mark()
    except LogUnreadable as e:
        ctx.log_unreadable = str(e)


def run_verify(seam: Seam, *, backend_label: str, given: Given | None = None,
               kernel_release: str | None = None, only: Sequence[str] | None = None,
               progress: Progress | None = None,
               record: list[CheckResult] | None = None, allow_kernel_warn: bool = False,
               kernel_log: KernelLog | None = None, strict: bool = False) -> VerifyReport:
    """Run the suite over `seam`; nothing here prints.

    `given` is what is known before the kernel is asked (kvmtdx.knowledge.given);
    the policy and host are completed from the capabilities as `probe` does.
    `only` limits the run to those check ids.  `record` gets each result as it is
    done, so a caller whose run is interrupted still has the checks done so far.
    `allow_kernel_warn` lets a check provoke a WARN on a real kernel (the simulated and
    kernel-source hosts always allow it), read through `kernel_log` (default: /dev/kmsg
    and its sysctls).  `strict` judges what a series leaves open (set_cpuid2_consistency)
    instead of recording it.
    """
    fds0, rss0 = _proc_numbers()
    start = _Start(backend_label, fds0, rss0)
    specs = [s for s in registered() if only is None or s.id in only]
    try:
        kvm = Kvm(seam)
    except KvmError as e:
        return start.skipped(e.reason) if e.skip else start.failed(e.reason)
    with kvm:
        caps = _capabilities(kvm, start)
        if isinstance(caps, VerifyReport):
            return caps
        know = complete(given if given is not None else Given(), caps, kernel_release)
        ctx = Context(kvm=kvm, seam=seam, know=know, caps=caps,
                      key_ids_before=free_key_ids(seam),
                      allow_kernel_warn=allow_kernel_warn, strict=strict,
                      kernel_log=kernel_log if kernel_log is not None else KernelLog())
        _log_start(ctx)
        ticker = _Ticker(len(specs), kvm.counters, progress)
        if progress is not None:
            ctx.on_td = ticker.show
        results = _run_all((s for s in specs if not s.after_close), ctx, ticker, record)
    fds1, rss1 = _proc_numbers()
    ctx.proc = ProcessNumbers(fds0, fds1, rss0, rss1)
    results += _run_all((s for s in specs if s.after_close), ctx, ticker, record)
    order = {s.id: i for i, s in enumerate(specs)}
    results.sort(key=lambda r: order[r.id])
    return VerifyReport(backend_label, know, tuple(results), _summary(results, kvm.counters,
                                                                      ctx.proc))

"""Wall time and peak memory of one configuration: the median of timed runs after warm-up,
the per-part breakdown from forward hooks and timer blocks, and the peak RSS (CPU) or peak
allocation (CUDA)."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

# ---------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartTimer:
    """Wall time per named part, from forward hooks and explicit ``part`` blocks.

    Several modules may share one name (``fpn`` and ``neck`` -> ``fpn_neck``; every update
    head -> ``update_stages``): their times add up. Disabled, the hooks do nothing (used
    for the hook-free CUDA totals).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = True
        self.totals: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}
        self._handles: list[Any] = []

    def attach(self, module: nn.Module, name: str) -> None:
        def pre(mod: nn.Module, args: Any) -> None:
            if self.enabled:
                _sync(self.device)
                self._start[id(mod)] = time.perf_counter()

        def post(mod: nn.Module, args: Any, out: Any) -> None:
            if self.enabled:
                _sync(self.device)
                self.totals[name] += time.perf_counter() - self._start.pop(id(mod))

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        _sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.totals[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.totals = defaultdict(float)
        self._start.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def part_of(timer: PartTimer | None) -> Callable[[str], contextlib.AbstractContextManager]:
    """``timer.part``, or a block that times nothing where there is no timer."""
    return timer.part if timer is not None else (lambda name: contextlib.nullcontext())


def measure(
    step: Callable[[], Any],
    device: torch.device,
    warmup: int,
    repeats: int,
    timer: PartTimer | None = None,
) -> dict[str, Any]:
    """Median wall time of ``step`` (and of the timer's parts) over ``repeats`` runs.

    Returns:
        ``total_ms`` (median), ``min_ms``, ``runs_ms`` (every timed run), ``parts_ms`` (the
        parts of the median run, the lower one for an even count; empty without a timer)
        and ``parts_total_ms`` (that run's total). Parts and total of ONE run are reported
        so that they add up; medians taken part by part need not. On CUDA with a timer,
        ``total_ms`` comes from extra hook-free runs, since every hook synchronizes.
    """
    for _ in range(warmup):
        step()
    totals: list[float] = []
    parts: list[dict[str, float]] = []
    for _ in range(repeats):
        if timer is not None:
            timer.reset()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        totals.append(time.perf_counter() - start)
        parts.append(dict(timer.totals) if timer is not None else {})
    median_run = sorted(range(repeats), key=totals.__getitem__)[(repeats - 1) // 2]
    parts_ms = {name: seconds * 1e3 for name, seconds in parts[median_run].items()}
    parts_total_ms = totals[median_run] * 1e3
    if timer is not None and device.type == "cuda":
        timer.enabled = False
        totals = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            totals.append(time.perf_counter() - start)
        timer.enabled = True
    return {
        "total_ms": statistics.median(totals) * 1e3,
        "min_ms": min(totals) * 1e3,
        "runs_ms": [t * 1e3 for t in totals],
        "parts_ms": parts_ms,
        "parts_total_ms": parts_total_ms,
    }


def round_robin(
    steps: Sequence[tuple[str, Callable[[], Any]]], device: torch.device, repeats: int, settle: int = 0
) -> dict[str, dict[str, Any]]:
    """Median and minimum milliseconds of each named step, timed one run of each per round.

    A slow spell of a shared host (+-20% over minutes on the AMD machine) then hits every step
    alike, so their ratios hold where back-to-back medians of :func:`measure` drift apart.
    Round 0 is the warm-up. ``settle`` untimed runs of a step precede each of its timed runs,
    so that it is timed in its own steady state (its memory back in the allocator's pools, its
    weights in the cache) rather than in the state the previous step left: a model that
    allocates more otherwise pays page faults a model timed alone does not.
    Returns ``{name: {total_ms, min_ms, runs_ms}}``.
    """
    runs: dict[str, list[float]] = {name: [] for name, _ in steps}
    for round_ in range(repeats + 1):
        for name, step in steps:
            for _ in range(settle if round_ else 0):
                step()
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if round_:
                runs[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"total_ms": statistics.median(ms), "min_ms": min(ms), "runs_ms": ms} for name, ms in runs.items()}


def per_round_ratio(timed: dict[str, dict[str, Any]], name: str, reference: str) -> float:
    """Median over the rounds of :func:`round_robin`'s ``timed`` of ``name``'s time over
    ``reference``'s in the same round (a ratio that a slow spell spanning a round cancels)."""
    pairs = zip(timed[name]["runs_ms"], timed[reference]["runs_ms"])
    return statistics.median(mine / theirs for mine, theirs in pairs)


def breakdown(result: dict[str, Any], order: Sequence[str]) -> dict[str, float]:
    """Parts in ``order``: ``losses`` = criterion - matching; ``other`` = the run's total - the rest."""
    parts = dict(result["parts_ms"])
    if "criterion" in parts:
        parts["losses"] = parts.pop("criterion") - parts.get("matching", 0.0)
    measured = sum(v for k, v in parts.items() if k != "other")
    parts["other"] = result["parts_total_ms"] - measured
    return {name: float(parts.get(name, 0.0)) for name in order}


# ---------------------------------------------------------------------------- memory


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of /proc/self/status; None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the RSS at the start of a
    configuration is what is live, not what earlier configurations left cached."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of one configuration.

    CPU: resets the kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs) and
    reads ``VmHWM`` afterwards; where that is impossible it falls back to
    ``ru_maxrss``, which is the peak over the whole process life (``scope`` says which).
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scope = "config"
        self.start_mb = 0.0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        _malloc_trim()
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.scope = "process"
        rss = _status_kb("VmRSS")
        self.start_mb = rss / 1024 if rss is not None else 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def result(self) -> dict[str, Any]:
        """``peak_mb``, ``delta_mb`` (peak - memory at the start) and ``mem_kind``."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return {"peak_mb": peak, "delta_mb": peak - self.start_mb, "mem_kind": "cuda_max_allocated"}
        hwm = _status_kb("VmHWM") if self.scope == "config" else None
        if hwm is None:
            import resource

            self.scope = "process"
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        peak = hwm / 1024
        kind = "rss_peak" if self.scope == "config" else "rss_peak_process_lifetime"
        return {"peak_mb": peak, "delta_mb": peak - self.start_mb, "mem_kind": kind}

"""Progress output for steps that take more than a few seconds: a tqdm bar
over an iterable, or one line per stage with its elapsed time (stderr)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator


def bar(iterable: Iterable, enabled: bool = True, **tqdm_kwargs) -> Iterable:
    """`iterable` wrapped in a tqdm bar when `enabled`."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **tqdm_kwargs)


@contextmanager
def stage(title: str, enabled: bool = True) -> Iterator[None]:
    """Print `title ...` now and `title: done in N s` when the block ends."""
    t0 = time.time()
    if enabled:
        print(f"{title} ...", file=sys.stderr, flush=True)
    yield
    if enabled:
        print(f"{title}: done in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)


def note(message: str, enabled: bool = True) -> None:
    """One line on stderr (when `enabled`)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)


class StageMeter:
    """Wall time and peak resident memory per named stage, over every entry
    into it (a stage entered once per layer adds up its time and keeps its
    largest peak). Stages nest: an outer stage's time and peak include the
    inner ones'. The peak comes from the kernel's high-water mark of this
    process (VmHWM), reset when a stage begins (`/proc/self/clear_refs`; Linux);
    where that is not possible only times are kept. On a CUDA device the peak
    of torch's allocations is kept too."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.peak_rss: Dict[str, int] = {}
        self.peak_cuda: Dict[str, int] = {}
        self._stack: list = []  # the peak each open stage has seen so far, before inner stages reset it

    @contextmanager
    def measure(self, key: str) -> Iterator[None]:
        t0 = time.time()
        if self._stack:
            self._stack[-1] = max(self._stack[-1], _rss_high_water())
        self._stack.append(0)
        _reset_high_water()
        try:
            yield
        finally:
            inner = self._stack.pop()
            peak = max(inner, _rss_high_water())
            self.seconds[key] = self.seconds.get(key, 0.0) + time.time() - t0
            if peak:
                self.peak_rss[key] = max(self.peak_rss.get(key, 0), peak)
                if self._stack:
                    self._stack[-1] = max(self._stack[-1], peak)
            cuda = _cuda_peak()
            if cuda:
                self.peak_cuda[key] = max(self.peak_cuda.get(key, 0), cuda)

    def as_dict(self) -> Dict[str, Dict[str, float]]:
        out = {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
               "peak_rss_bytes": dict(self.peak_rss)}
        if self.peak_cuda:
            out["peak_cuda_bytes"] = dict(self.peak_cuda)
        return out


def proc_status_bytes(key: str) -> int:
    """A kB entry of /proc/self/status (VmRSS, VmHWM) in bytes; 0 where unknown (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_high_water() -> int:
    """This process's peak resident set since the last reset."""
    return proc_status_bytes("VmHWM")


def _reset_high_water() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak() -> int:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return 0

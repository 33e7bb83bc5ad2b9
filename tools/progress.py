"""Progress output for steps that take more than a few seconds: a tqdm bar
over an iterable, or one line per stage with its elapsed time (stderr)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator


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

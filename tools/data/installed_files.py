"""Data files shipped inside installed PyPI distributions (found through
`importlib.metadata`, without importing the package)."""
from __future__ import annotations

import os
from importlib import metadata
from typing import Optional, Tuple


def find_in_distribution(dist_name: str, suffix: str) -> Tuple[Optional[str], str]:
    """(path of the first file of `dist_name` whose name ends with `suffix`, or
    None; the distribution's version). Raises `metadata.PackageNotFoundError`
    when the distribution is not installed."""
    dist = metadata.distribution(dist_name)
    for f in dist.files or ():
        if str(f).endswith(suffix):
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path, dist.version
    return None, dist.version

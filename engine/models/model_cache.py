"""The local cache of built and converted checkpoints: `$SLUICE_CACHE_DIR`, default ~/.cache/sluicegate.

Invariant: a directory under the cache root with a plain name is complete. Builders write into a
private temporary directory beside it and rename it into place (atomic on one filesystem), so a
reader never sees a half-written checkpoint, and concurrent first uses (two servers, pytest-xdist
workers) cannot corrupt the cache: the loser of the race discards its own copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SLUICE_CACHE_DIR") or Path.home() / ".cache" / "sluicegate")


def build_once(name: str, build: Callable[[Path], object]) -> Path:
    """`cache_root() / name`, calling `build(empty_dir)` to fill it first if it does not exist yet."""
    root = cache_root()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its finished copy first; theirs is as good as ours.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

"""Files written whole or not at all.

Every file the project writes for later (weights, configs, token shards, tokenizers, indexes, PNGs) goes
through `write_atomic`: the bytes go to a hidden temporary name beside the file, which is then renamed into
place (`os.replace`, atomic on one filesystem). A run killed while writing leaves the old file or none, never
a torn one that a later load would half-read. (`vae/` keeps its own copy of these four lines: it stands alone.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a temporary path beside `path` (its folder made if missing), then rename it to `path`.
    Writers that pick a format by the file's suffix must name it (PIL: format="PNG"): the temporary name ends
    in .tmp. A writer that raises leaves `path` as it was. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a writer that fails (or is interrupted) leaves the old file and no temporary one
        tmp.unlink(missing_ok=True)
        raise
    return path

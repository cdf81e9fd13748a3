"""Files written whole or not at all.

Every file the project writes for later (weights, configs, token shards, tokenizers, indexes, PNGs) goes
through `write_atomic`: the bytes go to a hidden temporary name beside the file, which is then renamed into
place (`os.replace`, atomic on one filesystem). A run killed while writing leaves the old file or none, never
a torn one that a later load would half-read. (`vae/` keeps its own copy of these four lines: it stands alone.)

A JSON file the user names (a run's config, an evaluation's result, the anchor's figures) is read by
`read_json_object`: a missing, broken or non-object file is one sentence naming it and the fix.

A command that writes where the user says checks the place first (`check_out_file`, `file_above`), so that long
work is not lost at its end, and says a failed write in one sentence (`said_if_unwritable`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UserError

# the process's umask, read once at import (reading it means setting it, which other threads would race with)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a temporary path beside `path` (its folder made if missing), then rename it to `path`.
    Writers that pick a format by the file's suffix must name it (PIL: format="PNG"): the temporary name ends
    in .tmp. A writer that raises leaves `path` as it was. The file gets the mode a new file gets (0o666 less the
    umask): safetensors writes 0600, which no other account could read a shared bundle by. The temporary name is
    this writer's own (process and thread): two writers of one file each rename a whole file, where with one
    name one renamed the other's half-written file into place and the other failed. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:  # a writer that fails (or is interrupted) leaves the old file and no temporary one
        tmp.unlink(missing_ok=True)
        raise
    return path


@functools.cache
def _warn_once_unlocked() -> None:
    warnings.warn(
        "this system has no file locks (fcntl): a second trainer started in the same run folder is not refused, "
        "so start one at a time",
        stacklevel=4,
    )


class LockHeld(Exception):
    """Another process holds the lock that `locked(..., wait=False)` asked for; `holder` is the note it left."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextlib.contextmanager
def locked(path: str | os.PathLike, wait: bool = True, note: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock (flock) on the file at `path` while the block runs. The kernel's lock goes with its
    process, so a killed holder leaves none behind. With `wait=False`, a lock another process holds raises
    LockHeld at once, with the note that process wrote into the file: `note` (a process id, say), written once
    the lock is held. Where the system has no flock (Windows), the block runs unlocked, with a warning once."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
        _warn_once_unlocked()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeld(os.read(fd, 32).decode(errors="replace").strip() or "unknown") from None
        if note is not None:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, note.encode())
        yield
    finally:
        os.close(fd)  # and with it the lock


def read_json_object(path: str | os.PathLike, what: str, fix: str, missing_fix: str | None = None) -> dict:
    """The JSON object in `path`. A file that is missing, not UTF-8 JSON, or holds no object is one sentence:
    "{what} '{path}' ...; {fix}" (`missing_fix` instead of `fix` when it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist; {missing_fix or fix}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} '{path}' is not valid JSON ({e.msg}); {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} '{path}' is not valid JSON (not UTF-8 text); {fix}") from None
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read ({e.strerror}); {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} '{path}' holds a {type(value).__name__}, not a JSON object; {fix}")
    return value


def file_above(path: str | os.PathLike) -> Path | None:
    """The nearest existing path above `path` when it is a file (nothing can be made under it), else None."""
    above = next((p for p in Path(path).parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


def unwritable(path: str | os.PathLike) -> Path | None:
    """The path that keeps `path` from being written, or None: `path` itself when it exists and cannot be written,
    else the nearest existing folder above it when nothing can be made in it (no permission, a read-only disk:
    access(2) says EROFS even to root)."""
    p = Path(path)
    if p.exists():
        return None if os.access(p, os.W_OK | (os.X_OK if p.is_dir() else 0)) else p
    above = next((q for q in p.parents if q.exists()), None)
    return None if above is None or os.access(above, os.W_OK | os.X_OK) else above


def check_out_file(path: str | os.PathLike | None, option: str = "--out", example: str = "result.json") -> None:
    """Refuse, before any work, an output path that cannot become a file (a folder, a path under a file, or one
    where nothing can be written); None: no file asked for."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} '{path}' is a folder; give a file name in it, such as {p / example}")
    above = file_above(p)
    if above is not None:
        raise UserError(f"{option} '{path}' is under '{above}', which is a file; choose another path")
    blocked = unwritable(p)
    if blocked is not None:
        raise UserError(
            f"{option} '{path}' cannot be written ('{blocked}' is read-only to this user); choose another path"
        )


@contextlib.contextmanager
def said_if_unwritable(path: str | os.PathLike, option: str = "--out") -> Iterator[None]:
    """Writes to a user's `path` inside: a failure (no room, no permission) said in one sentence naming `option`."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {option} '{path}' ({e.strerror or e}); choose a writable path") from None

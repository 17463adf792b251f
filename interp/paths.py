"""Where interp keeps what it downloads or generates (never inside the git checkout), and the one
way it writes files: whole or not at all (temporary sibling, fsync, rename, fsync of the folder),
under an advisory lock where several processes may write the same place."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from interp.errors import LockedError
from interp.faults import fault_point


def interp_home() -> Path:
    """The cache directory: ``$INTERP_HOME``, else ``~/.cache/interp``."""
    home = Path(os.environ.get("INTERP_HOME", Path.home() / ".cache" / "interp")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


# ------------------------------------------------------------------ atomic writes


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a rename is durable once its folder is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Create or replace the file ``path`` atomically: ``write(tmp)`` fills a temporary sibling,
    which is flushed to disk and renamed over ``path``; then the folder is flushed. If ``write``
    raises, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        fault_point(f"atomic-write:{path.name}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, value: Any, *, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(value, indent=indent, default=str))


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it is flushed and renamed to ``final``.

    If the body raises, the temporary folder is removed and ``final`` is untouched, so a reader
    never sees a half-written folder. An existing ``final`` is replaced by two renames (moved
    aside, then the new one in), so a crash between them leaves no ``final``: use this for caches
    that can be rebuilt; what must always exist (checkpoints) goes through a pointer file instead.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                fsync_path(Path(folder) / name)
            fsync_path(Path(folder))
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------ locks


@contextlib.contextmanager
def file_lock(path: str | Path, *, what: str = "", wait: bool = True) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the body.

    The holder writes its pid into the file, so a second process names it: with ``wait=True`` it
    says whom it waits for (on stderr) and blocks until the lock is free; with ``wait=False`` it
    raises ``LockedError``. The lock dies with its process (even on SIGKILL), so a crashed
    writer never leaves a stale lock. ``what`` names the locked thing in messages.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                raise LockedError(f"{what or path} is being written by {holder}; wait for it to finish, or stop it") from None
            print(f"waiting for {holder}, which is writing {what or path} ...", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "command": " ".join(sys.argv)[:300]}))
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder(path: Path) -> str:
    """'pid N (command, since T)' from a lock file, or a generic phrase if it is not written yet."""
    try:
        record = json.loads(path.read_text())
        return f"pid {record['pid']} ({record['command']}, since {record['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def resource_dir() -> Path:
    """The repository's data/ folder as installed: the package ``interp.resources`` (data/ ships
    as its package data, so a wheel install has it too)."""
    from importlib import resources

    return Path(str(resources.files("interp.resources")))


def resource_json(name: str) -> Any:
    """A JSON file of data/, read from the installed package."""
    from interp.errors import InputError

    path = resource_dir().joinpath(*name.split("/"))
    if not path.is_file():
        raise InputError(f"data/{name} is missing from the installed package interp.resources (an install without its package data?)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_format_json(folder: str | Path, name: str, format_name: str, what: str) -> dict[str, Any]:
    """``folder/name`` parsed, refused unless its ``format`` field is ``format_name`` (``what`` names it in errors)."""
    from interp.errors import InputError

    folder = Path(folder)
    try:
        meta = json.loads((folder / name).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{folder} holds no readable {name}: {err}") from err
    if meta.get("format") != format_name:
        raise InputError(f"{folder / name} is not {what}")
    return meta

"""Writes that a kill at any moment cannot leave half-done.

A file is written under a temp name owned by its writer, flushed to disk and renamed over its target in one
step (os.replace is atomic), so readers see the old version or the new one, never a mix. A folder is built
beside its target and swapped in; the old folder is removed only once the new one is in place.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable


def temp_name_for(path: Path) -> Path:
    """`<name>.<host>-<pid>.tmp`: each writer has its own temp file, so another process can tell a live
    writer's temp file (its process still runs) from a killed one's."""
    path = Path(path)
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


def temp_file_is_stale(tmp: Path, max_age_s: float = 60.0) -> bool:
    """A temp file left by a writer that is gone: its process no longer runs on this host, or (written on
    another host, or under an older naming) it has not changed for max_age_s."""
    owner = tmp.name[: -len(".tmp")].rsplit(".", 1)[-1]
    host, _, pid = owner.rpartition("-")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            return False
        return False
    try:
        return time.time() - tmp.stat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(temp_path) then rename it over path; if write raises, path keeps its old content."""
    path = Path(path)
    tmp = temp_name_for(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda p: Path(p).write_text(text))


def replace_folder(built: Path, dest: Path) -> None:
    """Swap a completed folder `built` in as `dest`, deleting the old one last: at every moment a complete
    version exists (dest, or dest.old for the instant between the two renames), never a half-written one."""
    built, dest = Path(built), Path(dest)
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(built, dest)
    shutil.rmtree(old, ignore_errors=True)


def move_files_into(built: Path, dest: Path) -> None:
    """Move every file of folder `built` into `dest`, each replacing its namesake in one step, then remove
    `built`: a reader of dest (another process loading while this one saves) never sees a half-written file."""
    built, dest = Path(built), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(built.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(f, dest / f.name)
    shutil.rmtree(built, ignore_errors=True)

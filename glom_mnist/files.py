"""How the commands write files: atomically, never over a user's file without `--force`, and
one training process per run folder.

- `atomic_write`: a temporary file beside the target, flushed to disk, then renamed over it, so
  a reader (or a crash) sees the old file or the new one, never half of one;
- `check_new_file`, `check_writable_folder`: refuse a bad output path before any work is done,
  in one line that says what to do;
- `run_folder_lock`: an advisory lock (`flock`) on `FOLDER/train.lock`, which the kernel releases
  when its process ends however it ends, so no stale lock survives a kill;
- `remove_stale_temporaries`: the temporary files a killed write leaves behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

LOCK_NAME = "train.lock"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(f)` into a temporary file beside `path`, then rename it over `path`. The file gets
    the permissions of the one it replaces, or else those the umask gives a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)       # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` (UTF-8) to `path`, atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def check_writable_folder(folder: str | Path, flag: str) -> None:
    """Create `folder` if needed and prove that a file can be written in it; a one-line
    ValueError naming `flag` (the option that gave it) otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag}: {folder} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{flag}: a part of {folder} is a file, not a folder; choose another "
                         "path") from None
    except OSError as err:
        raise ValueError(f"{flag}: cannot write in {folder} ({err.strerror or err}); choose "
                         "a folder you can write to") from None


def check_new_file(path: str | Path, *, force: bool | None, flag: str,
                   also: tuple[Path, ...] = ()) -> None:
    """Refuse to write `path` (or its companions `also`) over a folder, over an existing file
    unless `force` (None: the command has no --force, so an existing file is always refused),
    or where its folder cannot be written."""
    path = Path(path)
    for target in (path, *also):
        if target.is_dir():
            raise ValueError(f"{flag}: {target} is a folder; give the path of a file")
        if target.exists() and not force:
            what = "remove it first" if force is None else "pass --force to replace it"
            raise ValueError(f"{target} exists; {what}, or choose another path")
    check_writable_folder(path.parent, flag)


@contextlib.contextmanager
def run_folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold `folder/train.lock` while the block runs; ValueError at once if another process
    holds it. The file names the holder's pid, for the message."""
    folder = Path(folder)
    lock = folder / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"another training (pid {holder}) is writing {folder}; let it "
                             "finish (or stop it), or train into another --out-dir") from None
        try:                                 # the holder we waited on may have removed the file
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the `NAME.*.tmp` files of `atomic_write` for each of `names` in `folder` (only
    call this while holding the folder's lock: no write of ours is then in progress)."""
    stale = [p for p in Path(folder).glob("*.tmp")
             if p.is_file() and any(p.name.startswith(name + ".") for name in names)]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        print(f"removed {len(stale)} temporary file(s) left by an interrupted write: "
              + ", ".join(p.name for p in stale), file=sys.stderr)
    return stale

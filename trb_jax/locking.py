"""One trainer per workdir: an exclusive `fcntl.flock` on WORKDIR/.lock, held for the run.

    with WorkdirLock(workdir):      # WorkdirError naming the holder if another trainer has it
        ...train...

The kernel drops the lock when its holder exits in any way (kill -9 included), so a lock left
behind by a dead trainer is never in the way: the next trainer takes it and says whose it was.
The file holds the holder's host, pid and start time, for the message a second trainer prints;
a clean exit empties it (the file stays: removing it would race with a trainer about to lock
it), so a record found by the next trainer is that of a trainer that died holding the lock.
flock locks belong to the open file, so two trainers in one process exclude each other too.
On NFS, Linux emulates flock with POSIX byte-range locks, which the server arbitrates.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys

from trb_jax.errors import WorkdirError

__all__ = ["LOCK_FILE", "WorkdirLock", "holder"]

LOCK_FILE = ".lock"


def holder(workdir: str) -> dict | None:
    """The holder record in WORKDIR/.lock ({"host", "pid", "started"}), or None."""
    try:
        with open(os.path.join(workdir, LOCK_FILE)) as f:
            return _record(f.read())
    except OSError:
        return None


def _record(text: str) -> dict | None:
    """A holder record from the lock file's text: our JSON dict, or the foreign text kept as
    {"text": ...} (another tool's file of that name must not crash the trainer); None if empty."""
    text = text.strip()
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"text": text[:80]}


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (no holder recorded)"
    if "text" in info:
        return f"an unknown holder (lock file text {info['text']!r})"
    return (f"pid {info.get('pid')} on host {info.get('host')} "
            f"(started {info.get('started')})")


class WorkdirLock:
    """Exclusive lock on `workdir` for one trainer (a context manager; `acquire`/`release`)."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None
        self.previous: dict | None = None  # the record of the last holder, if it is gone

    def acquire(self) -> "WorkdirLock":
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirError(
                f"{self.workdir} is in use by another trainer: {_describe(holder(self.workdir))}; "
                f"wait for it to finish or use another --workdir (lock file {self.path})"
            ) from None
        except OSError:
            os.close(fd)
            raise
        self.previous = _record(os.read(fd, 4096).decode("utf-8", "replace"))
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        if self.previous:  # a clean exit empties the file: its holder died holding the lock
            print(f"note: {self.workdir} was locked by {_describe(self.previous)}, which ended "
                  "without releasing it (killed?); lock taken over", file=sys.stderr)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file tells the next trainer we ended cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

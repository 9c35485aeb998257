"""One writer per output folder: an advisory lock held while a command writes there.

Two `sae harvest` runs on one --out both exited 0 and left a corrupt cache; two `sae train` runs
interleaved metrics.jsonl and lost an SAE. The lock is flock(2) on a file in the folder: the
kernel drops it when the holding process ends in any way, SIGKILL included, so a lock is never
stale; the file keeps who held it last, to name in the refusal. Remote stores (s3:// and other
fsspec URLs) have no advisory locks: nothing is taken there.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".sae-forge.lock"


class FolderInUse(RuntimeError):
    """Another process is writing into the folder."""


@contextmanager
def exclusive(folder: str | Path) -> Iterator[None]:
    """Hold the folder's lock for the block; refuse at once, naming the holder, if it is held."""
    if "://" in str(folder):
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise FolderInUse(
                f"{folder} is being written by {holder}; wait for it to end or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command})".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock

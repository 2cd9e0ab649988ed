"""Another process holding a run's lock, as a second training or ``hsm plan`` would: for the refusal tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

__all__ = ["lock_held"]


@contextlib.contextmanager
def lock_held(lock: Path):
    """Hold ``lock`` (a ``filelock`` file) in a child process for the ``with`` block; yields the child (still alive
    while it holds the lock). Its parent folder must exist."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
                               "l.acquire(); print('held', flush=True); time.sleep(600)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()

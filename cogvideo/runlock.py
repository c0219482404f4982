"""One live run per output folder: the lock file a run holds while it writes there.

The trainer holds `checkpoint.dir`/LOCK, data preparation and sampling their `--out`/LOCK; a
second run on the same folder is refused in one line naming the holder, a lock left by a dead
run is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK = "LOCK"


class LockHeld(ValueError):
    """A live run holds the folder."""


class RunLock:
    """{dir}/LOCK names the live run writing a folder (host, pid, SLURM job id). A lock whose
    process is gone (same host) or that a requeued SLURM job left behind is stale and taken over;
    any other lock refuses the run. `key`: how the user names the folder (checkpoint.dir, --out)."""

    def __init__(self, root: str | Path, key: str = "checkpoint.dir"):
        self.path = Path(root) / LOCK
        self.key = key
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "pid_start": _process_start(os.getpid()),
        }

    def acquire(self) -> str | None:
        """Take the lock; returns a message when a stale lock was taken over. Raises LockHeld."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "x") as f:
                json.dump(self.me, f)
            return None
        except FileExistsError:
            pass
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}  # half written by a run killed while taking it
        stale = self._stale(holder)
        if stale is None:
            raise LockHeld(
                f"{self.key} {self.path.parent}: a live run holds it ({self.path}: host "
                f"{holder.get('host')}, pid {holder.get('pid')}, SLURM job {holder.get('slurm_job_id')}, "
                f"since {holder.get('started')}); "
                f"stop that run or use another {self.key} (delete {self.path} only if no run uses it)"
            )
        atomic_write(self.path, json.dumps(self.me))
        return f"taking over the stale lock {self.path} ({stale})"

    def _stale(self, holder: dict) -> str | None:
        """Why the holder is gone, or None when it may be alive."""
        if not holder:
            return "unreadable"
        job = holder.get("slurm_job_id")
        if job and job == self.me["slurm_job_id"]:
            return f"left by SLURM job {job}, requeued"
        if holder.get("host") != self.me["host"]:
            return None
        pid = int(holder.get("pid", -1))
        if _process_start(pid) is None:
            return f"pid {pid} on {holder['host']} is no longer running"
        if holder.get("pid_start") is not None and _process_start(pid) != holder["pid_start"]:
            return f"pid {pid} on {holder['host']} is now another process"
        return None

    def release(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)


def _process_start(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot, from /proc), 0 where /proc
    is absent; None when no such process exists."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` by `text` in one step: a reader sees the old or the new contents."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)

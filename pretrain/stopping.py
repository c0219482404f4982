"""Stopping a run by a signal without losing it.

The first SIGINT (Ctrl-C), SIGTERM or SIGUSR1 (SLURM's warning before the time limit) reaching
any rank asks the run to stop: every rank finishes its step, one checkpoint is saved, rank 0
prints one line naming it and the command that resumes, and the process exits with
`stopped_status`. Once a SIGINT has arrived, any further stop signal (a second Ctrl-C, or the
SIGTERM torchrun sends on it) ends the process at once: the lock is released, one line says
what was not saved, exit 130. A second SIGTERM or SIGUSR1 alone does not: SLURM follows its
warning with SIGTERM at the time limit, while the save it asked for may still be running.

Python runs a signal handler only when the main thread is back in the interpreter, and a rank
blocked in C (a store wait or a collective whose peer has just stopped at once) may not come
back for minutes. So the stop at once is not left to the handler: CPython's C-level handler
writes each signal number to `signal.set_wakeup_fd`'s pipe at once, and a thread reading it acts.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

from cogvideo.checkpoint.training import complete_tags

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
STOPPED_BY_SIGINT = 128 + signal.SIGINT  # what shells report for an interrupted command


def stopped_status(signum: int) -> int:
    """Exit status of a run stopped by `signum` after saving: 0 for SIGTERM / SIGUSR1 (preemption
    and time limits: the batch script or SLURM requeues, and `srun --kill-on-bad-exit` must not
    kill the other nodes while they finish), 130 for SIGINT (a person stopped it; `&&` stops)."""
    return STOPPED_BY_SIGINT if signum == signal.SIGINT else 0


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """The stop signals of this process. `signum` is the first one received (0: none yet);
    `at_once` functions run (in order) before a process stopped at once exits, which then says
    so in one line if it `speaks` (global rank 0), naming the last checkpoint in
    `checkpoint_dir` (once known) and `resume_command`."""

    def __init__(self, resume_command: str = "the same command with --resume auto", speaks: bool = False):
        self.signum = 0
        self.at_once: list[Callable[[], None]] = []
        self.resume_command = resume_command
        self.speaks = speaks
        self.checkpoint_dir: str | None = None
        self.signals_read = 0  # stop signals the watching thread has acted on

    def install(self) -> None:
        """From the main thread (Python's rule for handlers and the wakeup fd); replaces any
        wakeup fd set before."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_end,), name="stop-signals", daemon=True).start()

    def _on_signal(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def _watch(self, read_end: int) -> None:
        first = 0
        while numbers := os.read(read_end, 64):
            for signum in numbers:
                if signum not in STOP_SIGNALS:
                    continue
                if first == signal.SIGINT:
                    self.stop_now(signum)
                first = first or signum
                self.signals_read += 1

    def stop_now(self, signum: int) -> None:
        for action in self.at_once:
            try:
                action()
            except Exception as err:  # the process ends anyway; say why this part did not run
                print(f"cogvideo-train: while stopping at once: {type(err).__name__}: {err}", file=sys.stderr)
        if self.speaks:
            tags = complete_tags(self.checkpoint_dir) if self.checkpoint_dir else []
            last = os.path.join(self.checkpoint_dir, tags[-1]) if tags else "none"
            print(
                f"cogvideo-train: {signal_name(signum)} after SIGINT: stopped at once, without saving "
                f"(last checkpoint: {last}); resume with: {self.resume_command}",
                file=sys.stderr,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STOPPED_BY_SIGINT)

"""Starting Ray, the one place that does it (data preparation, the sampler, tests, benchmarks).

A busy machine can keep the local raylet from registering within Ray's fixed 30 s ("The current
node timed out during startup"); workers likewise within their registration timeout. So workers
get a longer registration timeout, and a local start that fails is shut down and tried again.
Connecting to a running cluster (`address`, or RAY_ADDRESS as `ray job submit` sets it) is not
retried: that cluster is the user's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time

from cogvideo.environment import apply_defaults

log = logging.getLogger(__name__)

START_ATTEMPTS = 2
WORKER_REGISTER_TIMEOUT_S = "180"  # Ray's default is 60 s


class RayStartError(RuntimeError):
    """Ray did not start; the message says what to do."""


def start_ray(
    address: str | None = None, num_cpus: int | None = None, attempts: int = START_ATTEMPTS, **kwargs
) -> None:
    """ray.init once per process: connect to `address` / RAY_ADDRESS, or start a local node with
    `num_cpus` (default: all) and no dashboard. Raises RayStartError with the way forward."""
    import ray

    if ray.is_initialized():
        return
    apply_defaults()
    os.environ.setdefault("RAY_worker_register_timeout_seconds", WORKER_REGISTER_TIMEOUT_S)
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **kwargs)
        return
    kwargs.setdefault("include_dashboard", False)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
            return
        except Exception as err:  # Ray raises bare Exceptions for a node that did not come up
            ray.shutdown()
            if attempt == attempts:
                raise RayStartError(
                    f"Ray could not start a local node in {attempts} tries ({str(err).splitlines()[0]}): the "
                    f"machine is too busy; retry when it is quieter, or start Ray first (`ray start --head "
                    f"--num-cpus {num_cpus or os.cpu_count()}`) and pass its address (--address auto)"
                ) from err
            log.warning("Ray's local node did not start (%s); trying again", str(err).splitlines()[0])
            time.sleep(2.0 * attempt)


# Ray Data's actor pools pass their constructor arguments (its DataContext and map function) as
# object references and restart actors (max_restarts=-1); Ray's core worker then prints this error
# for every pool it starts (ray-project/ray#53727), about Ray Data's own arguments, on every run.
RAY_ACTOR_ARGS_NOTICE = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: '[^']*' and ID: '[0-9a-f]+' has constructor arguments "
    rb"in the object store and max_restarts > 0\."
)


@contextlib.contextmanager
def stderr_without(pattern: re.Pattern[bytes] = RAY_ACTOR_ARGS_NOTICE):
    """Inside the block, drop the whole lines of this process's stderr that match `pattern` (at
    the file descriptor: Ray's C++ core worker writes there); every other byte passes through as it
    is written. Start it after Ray: processes started inside would inherit the pipe."""
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    forwarder = threading.Thread(target=_forward, args=(read_end, terminal, pattern), daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the pipe's last write end closes: the forwarder reads to its end
        forwarder.join(timeout=5.0)


def _forward(read_end: int, terminal: int, pattern: re.Pattern[bytes]) -> None:
    pending = b""
    try:
        while chunk := os.read(read_end, 1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not pattern.search(line))
            if not pending.startswith(
                b"["
            ):  # part of a line that is no C++ log line (a progress bar): pass it now
                kept, pending = kept + pending, b""
            _write_all(terminal, kept)
        _write_all(terminal, pending)
    finally:
        os.close(read_end)
        os.close(terminal)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]

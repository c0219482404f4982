"""Starting Ray, the one place that does it (data preparation, the sampler, tests, benchmarks).

A busy machine can keep the local raylet from registering within Ray's fixed 30 s ("The current
node timed out during startup"); workers likewise within their registration timeout. So workers
get a longer registration timeout, and a local start that fails is shut down and tried again.
Connecting to a running cluster (`address`, or RAY_ADDRESS as `ray job submit` sets it) is not
retried: that cluster is the user's.
"""

from __future__ import annotations

import logging
import os
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

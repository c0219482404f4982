"""How a training process finds its place: torchrun, the deepspeed launcher, srun, or none.

torch.distributed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. torchrun and
the deepspeed launcher set them; under srun they come from SLURM_*; run plainly
(`cogvideo-train --config ...`) the process is a world of one, as `python train.py` is in
nanoGPT and torchtitan; `cogvideo-train --nproc-per-node N` is torchrun's standalone launch
run in-process after the checks, so that a rank's failure ends in one line.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys

log = logging.getLogger("pretrain")

PR_SET_PDEATHSIG = 1


def rank_env() -> str:
    """Fill in the rank variables; returns where they came from ("launcher", "srun", "none")."""
    if "RANK" in os.environ:
        return "launcher"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        return "srun"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return "none"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_launcher() -> None:
    """Ask Linux to SIGKILL this process when its parent (the launcher's agent) dies, so that
    `kill -9` of torchrun or of the deepspeed launcher leaves no workers training on (they run in
    sessions of their own, which a terminal's hang-up does not reach)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning(
            "prctl(PR_SET_PDEATHSIG) failed (errno %d): workers may outlive their launcher",
            ctypes.get_errno(),
        )
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)


def launch_local(nproc: int, worker_args: list[str]) -> int:
    """Start `python -m pretrain.train WORKER_ARGS` as nproc ranks on this machine (torchrun
    --standalone, in this process) and wait for them. A rank that fails has printed its own line;
    this adds one naming the rank instead of torchrun's ChildFailedError block. Returns the exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "-m", "pretrain.train", *worker_args]
    )
    try:
        run(launch)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(
            f"cogvideo-train: rank {rank} exited with status {failure.exitcode} (its log is above)",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0

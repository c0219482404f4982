"""How a training process finds its place: torchrun, the deepspeed launcher, srun, or none.

torch.distributed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. torchrun and
the deepspeed launcher set them; under srun they come from SLURM_*; run plainly
(`cogvideo-train --config ...`) the process is a world of one, as `python train.py` is in
nanoGPT and torchtitan; `cogvideo-train --nproc-per-node N` is torchrun's standalone launch
run in-process after the checks, so that a rank's failure ends in one line.

torchrun run in-process (`run_torchrun`: `--nproc-per-node`, `cluster.slurm_env torchrun`) hands
every stop signal on to its workers and waits for them to save (`pretrain.stopping`), and ends
with their exit status instead of torchrun's SignalException traceback.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import socket
import sys

log = logging.getLogger("pretrain")

PR_SET_PDEATHSIG = 1
# torchrun hands these on to its workers; SLURM's `--signal=USR1@T` warning is among them
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 600  # seconds torchrun leaves its workers to save after a signal, then SIGKILL
LAUNCHER_VAR = "COGVIDEO_LAUNCHER"  # how the ranks were started, for the resume line
CHECKED_VAR = "COGVIDEO_CHECKED"  # set by the local launcher: its ranks repeat no start-up message


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


def run_torchrun(args: list[str], quiet: bool = False) -> int:
    """torchrun ARGS in this process; returns the exit status. A rank that fails has printed its
    own line: this adds one naming the rank instead of torchrun's ChildFailedError block. A stop
    signal torchrun handed on to its workers ends with the workers' status for it
    (`pretrain.stopping.stopped_status`) instead of torchrun's SignalException traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from pretrain.stopping import STOPPED_BY_SIGINT, stopped_status

    if quiet:  # torchrun's loggers read LOGLEVEL when created and keep their own level once they exist
        os.environ.setdefault("LOGLEVEL", "CRITICAL")
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(os.environ["LOGLEVEL"])
    try:
        run(get_args_parser().parse_args(args))
    except SignalException as err:
        return stopped_status(err.sigval)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode != STOPPED_BY_SIGINT:  # a rank stopped by Ctrl-C said so itself
            print(
                f"cogvideo-train: rank {rank} exited with status {failure.exitcode} (its log is above)",
                file=sys.stderr,
            )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def launch_local(nproc: int, worker_args: list[str]) -> int:
    """Start `python -m pretrain.train WORKER_ARGS` as nproc ranks on this machine (torchrun
    --standalone, in this process) and wait for them. Returns the exit status."""
    os.environ[LAUNCHER_VAR] = f"cogvideo-train --nproc-per-node {nproc}"
    os.environ[CHECKED_VAR] = "1"
    return run_torchrun(
        [
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            f"--signals-to-handle={FORWARDED_SIGNALS}",
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
            "-m",
            "pretrain.train",
            *worker_args,
        ],
        quiet=True,
    )


def launcher_command(local_rank_flag: bool = False) -> str:
    """How this rank was started, as a command to start it again: the launcher named in
    COGVIDEO_LAUNCHER, else torchrun, the deepspeed launcher, srun or none (`cogvideo-train`)."""
    if os.environ.get(LAUNCHER_VAR):
        return os.environ[LAUNCHER_VAR]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        local, world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), int(os.environ.get("WORLD_SIZE", 1))
        nodes = f" --nnodes {world // local}" if world > local else ""
        return f"torchrun{nodes} --nproc-per-node {local} -m pretrain.train"
    if local_rank_flag:
        return "deepspeed --module pretrain.train"
    if "SLURM_PROCID" in os.environ:
        return "srun python -m pretrain.train"
    return "cogvideo-train"


def resume_command(argv: list[str], local_rank_flag: bool = False) -> str:
    """The command that resumes this run: its launcher and arguments, any --resume or
    checkpoint.resume replaced by `--resume auto`."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--resume", "--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--resume=", "--local_rank=", "--local-rank=", "checkpoint.resume=")):
            args.append(arg)
    return f"{launcher_command(local_rank_flag)} {shlex.join([*args, '--resume', 'auto'])}"

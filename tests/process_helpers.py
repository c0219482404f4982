"""The tests' child processes: each must succeed, else the test fails showing the end of its output;
and a live process to name as the holder of a run's checkpoint-directory lock."""

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_ok(cmd: list[str], env: dict, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def trainer_command(nproc: int, port: int, script: str | None = None) -> tuple[list[str], dict]:
    """The command and environment that run `cogvideo-train` (or `script`, an entry point wrapping
    it) on `nproc` CPU ranks, one thread each: a world of one runs without a launcher, so the exit
    code is the trainer's own. Arguments go after the command."""
    target = [script] if script else ["-m", "pretrain.train"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if nproc == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        return [sys.executable, *target], env
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    return [sys.executable, *launcher, *target], env


def torchrun_self(test_file: str, args: list[str], timeout: float, **env: str) -> None:
    """Run the test module `test_file` as a script on 2 local ranks (torch.distributed.run), one
    thread each, with the repository on PYTHONPATH and `env` added."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        test_file,
        *args,
    ]
    run_ok(cmd, full_env, timeout)


@contextmanager
def sleeping_process(seconds: float) -> Iterator[int]:
    """The pid of a process that sleeps `seconds`: alive inside the block, killed and reaped after it."""
    sleeper = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    try:
        yield sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def write_lock(root: Path, **holder) -> None:
    """A checkpoint directory's LOCK file as a run on this host writes it, with `holder`'s fields."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", **holder}))


def write_kill_in_save_script(path: Path, step: int) -> Path:
    """A `cogvideo-train` entry point that SIGKILLs rank 0 after DeepSpeed wrote checkpoint `step`
    and before it is marked complete (the last moment a save can be lost); written to `path`."""
    path.write_text(
        f"""
import os, signal, sys
import pretrain.checkpoint as ckpt
import pretrain.train as train

mark = ckpt.CheckpointManager._mark_complete
def killed(self, path, record):
    if path.name == ckpt.tag_for({step}) and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    mark(self, path, record)
ckpt.CheckpointManager._mark_complete = killed
train.main(sys.argv[1:])
"""
    )
    return path

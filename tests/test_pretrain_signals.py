"""Stop signals through each launcher: real SIGINT, SIGTERM and SIGUSR1 sent to
`cogvideo-train --nproc-per-node 2` (each of the three), to one rank of a plain torchrun and to
`cluster.slurm_env torchrun` make every rank finish its step and save one checkpoint; each run ends in one line
naming it and the resume command, with the exit status for the signal, no traceback, no worker
left and the lock released. Resumed through the next launcher each time, the run's losses,
batches and weights equal those of a run never stopped, also after a bit flip in the newest
checkpoint made `--resume auto` fall back to the one before. A second Ctrl-C stops at once.

The stop logic of one process (`pretrain.stopping`) is tested in-process with real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from test_checkpoint_digest import flip
from test_pretrain_dist import PORTS, ROOT, base_args, step_batches
from test_pretrain_dist import ws as ws  # noqa: F401  (the shards, tokenizer and initial weights)

from cogvideo.checkpoint.cli import main as cli_main
from cogvideo.checkpoint.training import tag_for
from pretrain.launch import free_port, resume_command
from pretrain.stopping import STOPPED_BY_SIGINT, StopRequest

# the schedule of a long run; every run here is stopped by a signal long before its end
LONG = ("training.max_steps=1000", "checkpoint.every_steps=1000", "checkpoint.keep_last=3")


# ---- one process ------------------------------------------------------------------------------


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the stop-signal thread did not act in time"
        time.sleep(0.01)


@pytest.fixture
def own_stop_signals():
    """This process's stop-signal handlers and wakeup fd, restored after the test."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    signal.set_wakeup_fd(wakeup_fd)


def test_the_first_signal_asks_to_stop_and_a_second_after_sigint_stops_at_once(monkeypatch, own_stop_signals):
    exits, done = [], []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = StopRequest()
    stop.at_once.append(lambda: done.append("lock released"))
    stop.install()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # SLURM's TERM at the time limit, while saving: no effect
    wait_until(lambda: stop.signals_read == 2)
    assert stop.signum == signal.SIGUSR1 and not exits and not done
    stop = StopRequest()
    stop.at_once.append(lambda: done.append("lock released"))
    stop.install()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt, a request
    wait_until(lambda: stop.signals_read == 1)
    assert stop.signum == signal.SIGINT and not exits
    os.kill(os.getpid(), signal.SIGTERM)  # what torchrun sends on a second Ctrl-C
    wait_until(lambda: stop.signals_read == 2)
    assert exits == [STOPPED_BY_SIGINT] and done == ["lock released"]


def test_a_second_signal_stops_at_once_while_the_main_thread_waits_in_c(monkeypatch, own_stop_signals):
    """A rank blocked in a store wait (as for a peer that stopped at once and never answers) runs
    no Python handler until the wait returns: the stop at once must not wait for it."""
    exits = []
    monkeypatch.setattr(os, "_exit", lambda status: exits.append((status, time.monotonic())))
    StopRequest().install()
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=timedelta(seconds=3))
    os.kill(os.getpid(), signal.SIGINT)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(dist.DistStoreError):
        store.get("a key no rank sets")
    returned = time.monotonic()
    assert [status for status, _ in exits] == [STOPPED_BY_SIGINT]
    assert exits[0][1] < returned - 1, "stopped only once the blocking wait had returned"


def test_the_resume_command_replaces_any_resume_with_auto(monkeypatch):
    for var in ("COGVIDEO_LAUNCHER", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--config", "a b.yaml", "--resume", "runs/x/step00000004", "checkpoint.resume=auto", "optim.lr=1"]
    assert resume_command(argv) == "cogvideo-train --config 'a b.yaml' optim.lr=1 --resume auto"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert resume_command(["--local_rank=3", "--config", "c.yaml"]).startswith(
        "torchrun --nnodes 2 --nproc-per-node 8 -m pretrain.train --config c.yaml --resume auto"
    )


# ---- through the launchers (multi-process: slow) ----------------------------------------------


def command(launcher: str, ws, run_dir: Path, *extra: str) -> tuple[list[str], dict]:
    args = [*base_args(ws, run_dir, *LONG, *extra), "--resume", "auto"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if launcher == "nproc-per-node":
        return [sys.executable, "-m", "pretrain.train", "--nproc-per-node", "2", *args], env
    if launcher == "torchrun":
        torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={next(PORTS)}"]
        return [sys.executable, *torchrun, "-m", "pretrain.train", *args], env
    slurm = {"SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "2"}
    env.update(slurm, MASTER_PORT=str(next(PORTS)))
    return [sys.executable, "-m", "cluster.slurm_env", "torchrun", "--", *args], env


class Run:
    """A launcher started in the background; its workers are found as they start."""

    def __init__(self, launcher: str, ws, run_dir: Path, *extra: str):
        cmd, env = command(launcher, ws, run_dir, *extra)
        self.run_dir, self.log = run_dir, run_dir.with_name(run_dir.name + f".{launcher}.log")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.workers: dict[int, int] = {}  # rank -> pid

    def find_workers(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:  # the launcher has just ended
            return
        for child in children:
            try:  # a short-lived child (a compiler, a helper) may be gone between the two reads
                rank, cmdline = child.environ().get("RANK"), " ".join(child.cmdline())
            except psutil.Error:
                continue
            if rank is not None and "pretrain.train" in cmdline:
                self.workers[int(rank)] = child.pid

    def wait_for(self, ready, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                assert self.proc.poll() is None, f"ended before {what}:\n{self.log.read_text()[-4000:]}"
                self.find_workers()
                if ready():
                    return
                time.sleep(0.05)
            pytest.fail(f"no {what} in {timeout} s:\n{self.log.read_text()[-4000:]}")
        except BaseException:
            self.proc.kill()  # its workers die with it (PR_SET_PDEATHSIG)
            self.proc.wait()
            raise

    def wait_for_step(self, step: int) -> None:
        self.wait_for(lambda: len(self.workers) == 2 and last_step(self.run_dir) >= step, f"step {step}")

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # its workers die with it: a failed test leaves none behind
            self.proc.wait()
            raise
        return code, self.log.read_text()


def last_step(run_dir: Path) -> int:
    path = run_dir / "logs/metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def metrics(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert steps == list(range(1, len(rows) + 1)), steps  # one row per step, none dropped
    return {row["step"]: row["loss"] for row in rows}


def assert_stopped(run: Run, code: int, out: str, sig: str, status: int) -> int:
    """One line naming the saved checkpoint and the resume command, the signal's exit status,
    no traceback, no worker left, no lock; returns the step saved."""
    assert code == status, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    lines = [line for line in out.splitlines() if line.startswith("cogvideo-train:")]
    assert len(lines) == 1 and f"cogvideo-train: {sig} at step " in lines[0], out[-4000:]
    step = int(lines[0].split(" at step ")[1].split(":")[0])
    assert f"saved {run.run_dir / tag_for(step)}; resume with: " in lines[0] and lines[0].endswith(
        "--resume auto"
    )
    assert (run.run_dir / tag_for(step) / "COMPLETE").is_file() and (
        run.run_dir / "latest"
    ).read_text() == tag_for(step)
    assert not (run.run_dir / "LOCK").exists()
    assert sorted(run.workers) == [0, 1] and not any(map(psutil.pid_exists, run.workers.values()))
    assert max(metrics(run.run_dir)) == step
    return step


def stop_each_way(ws, chain: Path) -> int:
    """Ctrl-C to `--nproc-per-node`, SIGTERM to one rank of torchrun, SIGUSR1 to
    `cluster.slurm_env torchrun`, each resuming where the one before stopped; the last step saved."""
    run = Run("nproc-per-node", ws, chain)
    run.wait_for_step(2)
    run.proc.send_signal(signal.SIGINT)
    code, out = run.finish()
    first = assert_stopped(run, code, out, "SIGINT", STOPPED_BY_SIGINT)
    assert out.count("--resume auto: no complete checkpoint in") == 1

    run = Run("torchrun", ws, chain)  # preemption noticed by one rank only
    run.wait_for_step(first + 2)
    os.kill(run.workers[1], signal.SIGTERM)
    code, out = run.finish()
    second = assert_stopped(run, code, out, "SIGTERM", 0)
    assert f"resumed from {chain / tag_for(first)}" in out

    run = Run("slurm", ws, chain)  # SLURM's warning before the time limit, to the launcher
    run.wait_for_step(second + 2)
    run.proc.send_signal(signal.SIGUSR1)
    code, out = run.finish()
    assert "resume with: python -m cluster.slurm_env torchrun -- " in out
    return assert_stopped(run, code, out, "SIGUSR1", 0)


def corrupt_and_fall_back(ws, chain: Path, last: int, before: int) -> int:
    """16 bytes of an Adam moment file of the newest checkpoint flipped: inspect and the converter
    fail naming the file, resuming it by name fails in one line before any rank loads, and
    `--resume auto` skips it (saying why) for the one before; the last step saved."""
    optim = chain / tag_for(last) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip(optim)
    assert cli_main(["inspect", str(chain / tag_for(last))]) == 1
    assert cli_main(["zero", str(chain), str(chain.with_name("converted"))]) == 2
    cmd, env = command("nproc-per-node", ws, chain)
    named = subprocess.run(
        [*cmd, "--resume", str(chain / tag_for(last))], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert named.returncode == 2 and "Traceback" not in named.stderr, named.stderr[-4000:]
    lines = [line for line in named.stderr.splitlines() if line.startswith("cogvideo-train:")]
    assert len(lines) == 2 and f"{optim}: contents differ from the sha256 digest" in lines[0], named.stderr
    assert lines[1].endswith("exited with status 2 (its log is above)")  # the launcher's

    (chain / "latest").write_bytes(b"\x00\xff garbage")
    run = Run("nproc-per-node", ws, chain)
    run.wait_for_step(last + 2)
    run.proc.send_signal(signal.SIGTERM)
    code, out = run.finish()
    assert f"--resume auto: skipping {chain / tag_for(last)}: {optim}: contents differ" in out
    assert f"resumed from {chain / tag_for(before)} at step {before}" in out
    return assert_stopped(run, code, out, "SIGTERM", 0)


@pytest.mark.slow
def test_each_launcher_and_signal_saves_and_the_resumed_run_equals_an_unstopped_one(ws, tmp_path):
    chain = tmp_path / "chain"
    last = stop_each_way(ws, chain)
    before = max(int(p.name[4:]) for p in chain.glob("step*") if p.name != tag_for(last))
    final = corrupt_and_fall_back(ws, chain, last, before)

    whole = tmp_path / "whole"  # the same run never stopped before `final`: saved at every step
    run = Run("nproc-per-node", ws, whole, "checkpoint.every_steps=1", "checkpoint.keep_last=1000")
    run.wait_for_step(final + 1)
    run.proc.send_signal(signal.SIGUSR1)  # the lost steps and zombies: USR1 to this launcher
    assert_stopped(run, *run.finish(), "SIGUSR1", 0)
    expected, resumed = metrics(whole), metrics(chain)
    assert [resumed[s] for s in range(1, final + 1)] == [expected[s] for s in range(1, final + 1)]
    batches = step_batches(whole)
    assert step_batches(chain) == {s: batches[s] for s in range(1, final + 1)}
    a, b = (torch.load(d / tag_for(final) / "model_full.pt") for d in (whole, chain))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` installed (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(ws, tmp_path):
    """Both Ctrl-Cs reach the launcher while its ranks start: the first asks them to stop, the
    second (torchrun hands it on as SIGTERM) ends them at once, without a checkpoint."""
    run = Run("nproc-per-node", ws, tmp_path / "run")
    run.wait_for(
        lambda: len(run.workers) == 2 and all(catches(pid, signal.SIGUSR1) for pid in run.workers.values()),
        "stop-signal handlers in both ranks",
    )
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    run.proc.send_signal(signal.SIGINT)
    sent = time.time()
    code, out = run.finish(timeout=60)
    assert time.time() - sent < 30
    assert code == STOPPED_BY_SIGINT and "Traceback" not in out, out[-4000:]
    lines = [line for line in out.splitlines() if line.startswith("cogvideo-train:")]
    assert len(lines) == 1 and "stopped at once" in lines[0] and "last checkpoint: none" in lines[0], out
    assert not (run.run_dir / "LOCK").exists() and not list(run.run_dir.glob("step*"))
    assert not any(map(psutil.pid_exists, run.workers.values()))

"""The trainer's command line and its launchers: bad input fails in one line, exit 2, before any
process group starts (under `--nproc-per-node` too, and a rank's own failure ends in its line and the
launcher's), a start without a launcher is a world of one, workers die with their launcher, and the
rank variables come from the launcher, srun or a default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from process_helpers import sleeping_process, write_lock
from test_pretrain_data import write_caption_tokenizer, write_shards

from cogvideo.models.cogvideo.config import get_preset
from pretrain.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tiny_test.yaml")


# ---- fail fast, in one line, before any process group ---------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    return {"root": root, "shards": write_shards(root), "tokenizer": write_caption_tokenizer(root)}


def train_cli(ws, *overrides, world=2, timeout=120, env=None):
    """Rank 0 of a world whose other ranks never come: reaching init_process_group would hang."""
    full_env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "DS_ACCELERATOR": "cpu",
        **(env or {}),
    }
    return trainer(train_args(ws, *overrides), full_env, timeout)


def train_args(ws, *overrides, run_dir: Path | None = None):
    return [
        "--config",
        CONFIG,
        f"data.shards=[{','.join(ws['shards'])}]",
        f"data.text_tokenizer={ws['tokenizer']}",
        f"checkpoint.dir={run_dir or ws['root'] / 'run'}",
        "data.max_cut_text=1",
        *overrides,
    ]


def trainer(args, env, timeout):
    return subprocess.run(
        [sys.executable, "-m", "pretrain.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def assert_one_line_exit_2(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cogvideo-train:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_or_oversized_text_tokenizer_fails_fast(ws, tmp_path):
    assert_one_line_exit_2(
        train_cli(ws, f"data.text_tokenizer={tmp_path / 'nope.model'}"),
        "data.text_tokenizer",
        "nope.model",
        "not found",
    )
    from cogvideo.tokenizers.text import train_text_tokenizer

    big = train_text_tokenizer(
        [f"word{i} thing{i * 7} other{i * 13}" for i in range(3000)],
        tmp_path / "big",
        400,
        byte_fallback=False,
        preset="tiny",
    )
    layout = get_preset("tiny").vocab
    assert_one_line_exit_2(
        train_cli(ws, f"data.text_tokenizer={big}"),
        "data.text_tokenizer",
        "400 pieces",
        f"num_text_tokens={layout.num_text_tokens}",
    )


def test_a_rank_left_with_only_bad_shards_is_named_before_training(ws, tmp_path):
    bad = []
    for i in range(2):
        path = tmp_path / f"bad-{i}.tar"
        path.write_bytes(os.urandom(4096))
        bad.append(str(path))
    good = [ws["shards"][0]]
    # 3 shards for 2 DP ranks: some rank gets only unreadable ones in the first epoch
    for seed in range(50):
        from pretrain.data import rank_shards

        if any(all(p in bad for p in rank_shards(good + bad, seed, 0, r, 2)) for r in range(2)):
            break
    proc = train_cli({**ws, "shards": good + bad}, f"training.seed={seed}")
    assert_one_line_exit_2(proc, "every shard of data-parallel rank", "bad-", "unreadable")


def test_captions_cut_by_text_length_fail_with_the_numbers_unless_allowed(ws):
    proc = train_cli(ws, "data.max_cut_text=0.05")  # the default
    assert_one_line_exit_2(proc, "sampled captions are longer than model.text_length=8", "data.max_cut_text")
    from cogvideo.tokenizers.text import TextTokenizer
    from pretrain.config import DataConfig
    from pretrain.data import check_text_length

    cfg = get_preset("tiny").replace(text_length=8)
    encode = TextTokenizer(ws["tokenizer"], cfg.vocab).encode
    summary = check_text_length(ws["shards"], cfg, encode, DataConfig(max_cut_text=1.0))
    cut, total = (int(x) for x in summary.split(" sampled")[0].split(" of "))
    assert total == 24 and cut > 0.05 * total


@contextmanager
def run_locked_by_a_live_process(ws, seconds: float) -> Iterator[int]:
    """The default run directory's LOCK names a live process (its pid) inside the block; removed after."""
    run = ws["root"] / "run"
    with sleeping_process(seconds) as pid:
        write_lock(run, pid=pid, slurm_job_id=None)
        try:
            yield pid
        finally:
            (run / "LOCK").unlink()


def test_a_locked_checkpoint_dir_refuses_a_second_run(ws):
    with run_locked_by_a_live_process(ws, 120) as pid:
        assert_one_line_exit_2(train_cli(ws), "a live run holds it", f"pid {pid}")


# ---- a plain start, and workers that die with their launcher (multi-process: slow) ----------


def launch_cli(ws, *overrides):
    """`cogvideo-train --nproc-per-node 2 ...` with no launcher variables around it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return trainer(["--nproc-per-node", "2", *train_args(ws, *overrides)], env, timeout=300)


def test_nproc_per_node_checks_before_any_rank_starts(ws, tmp_path):
    proc = launch_cli(ws, f"data.text_tokenizer={tmp_path / 'nope.model'}")
    assert_one_line_exit_2(proc, "data.text_tokenizer", "nope.model", "not found")
    assert "ChildFailedError" not in proc.stderr and "local_rank" not in proc.stderr


@pytest.mark.slow
def test_a_rank_failing_under_nproc_per_node_ends_in_its_line_and_the_launchers(ws):
    """What only a rank can see (the checkpoint lock is taken by rank 0): its own line, then the
    launcher's line naming the rank, and neither a traceback nor torchrun's ChildFailedError block."""
    with run_locked_by_a_live_process(ws, 300):
        proc = launch_cli(ws)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cogvideo-train:")]
    assert len(lines) == 2 and "a live run holds it" in lines[0], proc.stderr[-3000:]
    assert "rank 0 exited with status 2" in lines[1]


@pytest.mark.slow
def test_without_a_launcher_the_trainer_runs_as_a_world_of_one(ws):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith("SLURM_")
    }
    run = ws["root"] / "plain"
    proc = trainer(train_args(ws, "training.max_steps=2", run_dir=run), {**env, "DS_ACCELERATOR": "cpu"}, 600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world 1 = TP 1 x DP 1" in proc.stderr
    counts = get_preset("tiny")  # trained from scratch: every parameter trains
    assert "parameters train" in proc.stderr and "frozen" not in proc.stderr, counts.name
    assert (run / "latest").read_text() == "step00000002" and not (run / "LOCK").exists()


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are dead
    except OSError:
        return False


WORKER = """
import os, sys, time
from pretrain.launch import die_with_launcher
die_with_launcher()
open(os.path.join(sys.argv[1], f"pid{os.environ['RANK']}"), "w").write(str(os.getpid()))
time.sleep(300)
"""


@pytest.mark.slow
def test_workers_die_with_a_killed_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(script),
            str(tmp_path),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(list(tmp_path.glob("pid*"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid*")]
    assert len(pids) == 2
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 10
    while any(map(running, pids)) and time.time() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in pids if running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "workers outlived their launcher"


def test_rank_variables_come_from_the_launcher_srun_or_default_to_a_world_of_one(monkeypatch):
    from pretrain.launch import rank_env

    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert rank_env() == "none"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == (
        "0",
        "1",
        "127.0.0.1",
    )
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert rank_env() == "srun"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert rank_env() == "launcher"  # already set: left alone

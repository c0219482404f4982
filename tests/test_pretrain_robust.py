"""The trainer against hostile files, dead launchers, busy machines and user mistakes: nothing in a
checkpoint runs code, workers die with their launcher, one live run per checkpoint directory,
one metrics row per step, Ray starts on a busy machine, and bad input fails in one line, exit 2,
before any process group starts."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain_data import write_shards

from cogvideo import parallel
from cogvideo.checkpoint import CheckpointError
from cogvideo.checkpoint.training import load_part, part_file, save_part
from cogvideo.config import get_preset
from pretrain.checkpoint import CheckpointManager, RNGState, RunLock
from pretrain.config import check_config, load_train_config
from pretrain.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tiny_test.yaml")


class Planted:
    """Unpickling this runs `touch <marker>`: what a hostile file in a checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- nothing in a checkpoint runs code -------------------------------------------------------


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    def model_parallel_draw():  # what attention dropout under TP draws from
        with parallel.HOST_RNG_TRACKER.fork():
            return torch.rand(4)

    random.seed(1), np.random.seed(2), parallel.manual_seed(3)
    random.random(), np.random.normal(), torch.randn(3), model_parallel_draw()  # mid-stream
    save_part(tmp_path, "rng", "rank", 0, RNGState().state_dict())
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.randn(4), model_parallel_draw())
    random.seed(9), np.random.seed(9), parallel.manual_seed(9)
    RNGState().load_state_dict(load_part(tmp_path, "rng", "rank", 0))
    got = (random.random(), np.random.normal(), np.random.rand(), torch.randn(4), model_parallel_draw())
    assert got[:3] == expected[:3] and all(torch.equal(a, b) for a, b in zip(got[3:], expected[3:]))


def test_a_planted_rng_file_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    with open(part_file(tmp_path, "rng", "rank", 0), "wb") as f:
        pickle.dump(Planted(marker), f)
    torch.save({"consumed": 0}, part_file(tmp_path, "loader", "dp", 0))
    manager = CheckpointManager(tmp_path, 1, parts={"loader": (None, "dp"), "rng": (None, "rank")})
    with pytest.raises(CheckpointError, match="rng_rank0.pt"):
        manager.check(tmp_path, dp_size=1)  # the pre-flight check reads every part, weights-only
    with pytest.raises(CheckpointError):
        load_part(tmp_path, "rng", "rank", 0)
    assert not marker.exists()


def test_a_planted_deepspeed_file_does_not_run(tmp_path):
    from pretrain.checkpoint import WeightsOnlyLoads

    marker = tmp_path / "pwned"
    planted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "hook": Planted(marker)}, planted)
    manager = CheckpointManager(tmp_path, 1, parts={})
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: refers to .*system"):
        manager.check(tmp_path, dp_size=1)

    class Engine:  # DeepSpeed's TorchCheckpointEngine loads with weights_only=False
        def load(self, path, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=False)

    with pytest.raises(CheckpointError, match="refused to unpickle posix.system") as refused:
        WeightsOnlyLoads(Engine()).load(str(planted))
    assert "weights_only" not in str(refused.value)  # never torch's advice to load unsafely
    assert not marker.exists()


# ---- one live run per checkpoint directory --------------------------------------------------


def write_lock(root: Path, **holder) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", **holder}))


def test_a_live_run_holds_the_directory(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid, slurm_job_id="41")
        with pytest.raises(CheckpointError, match=rf"a live run holds it .*pid {sleeper.pid}, SLURM job 41"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    # now dead on this host: stale, taken over with a message naming why
    message = RunLock(tmp_path).acquire()
    assert message is not None and f"pid {sleeper.pid}" in message and "no longer running" in message
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()


def test_other_hosts_refuse_and_a_requeued_slurm_job_takes_over(tmp_path, monkeypatch):
    write_lock(tmp_path, host="node-elsewhere", pid=1, slurm_job_id="77")
    with pytest.raises(CheckpointError, match="node-elsewhere"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued onto this host
    assert "requeued" in RunLock(tmp_path).acquire()


def test_a_run_releases_its_own_lock_only(tmp_path):
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    assert RunLock(tmp_path)._stale(json.loads((tmp_path / "LOCK").read_text())) is None  # we are alive
    lock.release()
    assert not (tmp_path / "LOCK").exists()
    write_lock(tmp_path, pid=1, host="node-elsewhere")
    lock.release()
    assert (tmp_path / "LOCK").exists()


# ---- one metrics row per step ---------------------------------------------------------------


def test_a_resumed_run_keeps_one_metrics_row_per_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(start, stop):
        logger = MetricsLogger(
            tmp_path,
            True,
            total_steps=6,
            start_step=start,
            print_every=100,
            tensorboard=True,
            progress_bar=False,
        )
        for step in range(start + 1, stop + 1):
            logger.log(
                step,
                {
                    "loss": float(step) + start / 10,
                    "lr": 0.1,
                    "grad_norm": 1.0,
                    "tokens_per_s": 1.0,
                    "samples_per_s": 1.0,
                    "mfu": 0.0,
                },
            )
        logger.close()
        time.sleep(1.1)  # TensorBoard names event files by the second

    run(0, 5)  # killed after step 5, last checkpoint at step 3
    run(3, 6)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows][3:] == [4.3, 5.3, 6.3]  # the repeated steps are the new run's
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6]
    assert [round(e.value, 3) for e in scalars][3:] == [4.3, 5.3, 6.3]


# ---- Ray on a busy machine ------------------------------------------------------------------


def test_ray_start_retries_once_then_says_what_to_do(monkeypatch):
    import ray

    from cogvideo import raystart

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) < failures + 1:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(raystart.time, "sleep", lambda s: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    failures = 1
    raystart.start_ray(num_cpus=2)
    assert len(calls) == 2 and calls[-1]["num_cpus"] == 2 and calls[-1]["include_dashboard"] is False
    assert os.environ["RAY_worker_register_timeout_seconds"] == raystart.WORKER_REGISTER_TIMEOUT_S
    calls.clear()
    failures = 2
    with pytest.raises(raystart.RayStartError) as err:
        raystart.start_ray(num_cpus=2)
    assert len(calls) == 2
    assert "timed out during startup" in str(err.value) and "ray start --head --num-cpus 2" in str(err.value)
    assert "\n" not in str(err.value)


# ---- from scratch, everything trains --------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, trains_backbone",
    [
        ([], True),  # from scratch
        (["model.train_backbone=false"], False),  # told otherwise
        (["init.backbone=some/cogview2"], False),  # from a backbone: the preset's choice (frozen)
    ],
)
def test_training_from_scratch_trains_the_backbone(overrides, trains_backbone):
    cfg = load_train_config(CONFIG, ["data.shards=[a.tar]", *overrides])
    assert check_config(cfg, 1).train_backbone is trains_backbone
    assert cfg.model.get("train_backbone", False) is trains_backbone  # recorded in the checkpoint's config


# ---- fail fast, in one line, before any process group ---------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from cogvideo.tokenizers.text import train_text_tokenizer

    root = tmp_path_factory.mktemp("robust")
    shards = write_shards(root)
    captions = [f"clip {s} {i}" for s in range(4) for i in range(6)] * 4
    return {
        "root": root,
        "shards": shards,
        "tokenizer": str(train_text_tokenizer(captions, root / "text", 60, byte_fallback=False)),
    }


def train_cli(ws, *overrides, world=2, timeout=120, env=None):
    """Rank 0 of a world whose other ranks never come: reaching init_process_group would hang."""
    full_env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29998",
        "DS_ACCELERATOR": "cpu",
        **(env or {}),
    }
    return trainer(train_args(ws, *overrides), full_env, timeout)


def train_args(ws, *overrides):
    return [
        "--config",
        CONFIG,
        f"data.shards=[{','.join(ws['shards'])}]",
        f"data.text_tokenizer={ws['tokenizer']}",
        f"checkpoint.dir={ws['root'] / 'run'}",
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


def test_a_locked_checkpoint_dir_refuses_a_second_run(ws):
    run = ws["root"] / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(run, pid=sleeper.pid, slurm_job_id=None)
        assert_one_line_exit_2(train_cli(ws), "a live run holds it", f"pid {sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
        (run / "LOCK").unlink()


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
    run = ws["root"] / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        write_lock(run, pid=sleeper.pid, slurm_job_id=None)
        proc = launch_cli(ws)
    finally:
        sleeper.kill()
        sleeper.wait()
        (run / "LOCK").unlink()
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
    args = [
        "--config",
        CONFIG,
        f"data.shards=[{','.join(ws['shards'])}]",
        f"data.text_tokenizer={ws['tokenizer']}",
        f"checkpoint.dir={run}",
        "data.max_cut_text=1",
        "training.max_steps=2",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.train", *args],
        env={**env, "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
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
            "--master_port=29997",
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

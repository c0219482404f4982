"""The trainer's parts against hostile files, live and dead runs, resumes and busy machines: nothing
in a checkpoint runs code, one live run per checkpoint directory, one metrics row per step, Ray
starts on a busy machine, and a run from scratch trains everything. The command line's own checks
and its launchers are in test_pretrain_launch.py."""

from __future__ import annotations

import json
import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from process_helpers import sleeping_process, write_lock

from cogvideo import parallel
from cogvideo.checkpoint import CheckpointError
from cogvideo.checkpoint.training import load_part, part_file, save_part
from cogvideo.runlock import LockHeld, RunLock
from pretrain.checkpoint import CheckpointManager, RNGState
from pretrain.config import check_config, load_train_config
from pretrain.metrics import MetricsLogger

CONFIG = str(Path(__file__).resolve().parents[1] / "configs/tiny_test.yaml")


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
    from pretrain.checkpoint import SafeCheckpointEngine

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
        SafeCheckpointEngine(Engine()).load(str(planted))
    assert "weights_only" not in str(refused.value)  # never torch's advice to load unsafely
    assert not marker.exists()


# ---- one live run per checkpoint directory --------------------------------------------------


def test_a_live_run_holds_the_directory(tmp_path):
    with sleeping_process(60) as pid:
        write_lock(tmp_path, pid=pid, slurm_job_id="41")
        with pytest.raises(LockHeld, match=rf"a live run holds it .*pid {pid}, SLURM job 41"):
            RunLock(tmp_path).acquire()
    # now dead on this host: stale, taken over with a message naming why
    message = RunLock(tmp_path).acquire()
    assert message is not None and f"pid {pid}" in message and "no longer running" in message
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()


def test_other_hosts_refuse_and_a_requeued_slurm_job_takes_over(tmp_path, monkeypatch):
    write_lock(tmp_path, host="node-elsewhere", pid=1, slurm_job_id="77")
    with pytest.raises(LockHeld, match="node-elsewhere"):
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


def test_a_fresh_start_keeps_the_rows_an_earlier_run_left(tmp_path):
    """A run stopped before its first checkpoint, started again from step 0: its rows are kept aside,
    not dropped (they are dropped only by a resume that starts before them)."""
    row = {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 1.0, "samples_per_s": 1.0, "mfu": 0.0}
    options = dict(total_steps=9, print_every=100, tensorboard=False, progress_bar=False)
    for resumed in (True, False):
        logger = MetricsLogger(tmp_path, True, start_step=0, resumed=resumed, **options)
        for step in (1, 2, 3):
            logger.log(step, row)
        logger.close()
    kept = list(tmp_path.glob("metrics.before-*.jsonl"))
    assert len(kept) == 1 and [json.loads(line)["step"] for line in kept[0].read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]


def test_starting_weights_that_do_not_open_whole_are_one_line_before_any_rank(tmp_path):
    from cogvideo.checkpoint import save_model_checkpoint
    from cogvideo.family import build_model
    from cogvideo.models.cogvideo.config import get_preset
    from pretrain.startup import check_starting_weights

    cfg = get_preset("tiny")
    weights = save_model_checkpoint(tmp_path / "init", build_model(cfg).state_dict(), cfg)
    train = load_train_config(CONFIG, ["data.shards=[a.tar]", f"init.weights={weights}"])
    check_starting_weights(train)  # whole
    shard = next(weights.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError, match=rf"^init.weights: {shard}: not a complete safetensors file"
    ) as err:
        check_starting_weights(train)
    assert "\n" not in str(err.value)


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

"""Training config: loading, validation before any process group, optimizer groups, schedule."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvideo.configio import ConfigError
from pretrain.config import TrainConfig, check_config, load_train_config
from pretrain.launch import free_port
from pretrain.optim import deepspeed_config, lr_factor, no_weight_decay

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SHARDS = ["data.shards=[x.tar]"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_train_config(str(path), SHARDS)
    model_cfg = check_config(cfg, world_size=cfg.parallel.tensor_parallel * 2, has_gpu=True)
    assert model_cfg.name == cfg.model["preset"]


def test_overrides_reach_the_model_and_sections():
    cfg = load_train_config(
        str(ROOT / "configs/tiny_test.yaml"),
        SHARDS + ["model.num_layers=3", "optim.lr=5e-4", "parallel.zero_stage=3"],
    )
    assert check_config(cfg, 1).num_layers == 3
    assert cfg.optim.lr == 5e-4 and cfg.parallel.zero_stage == 3


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["bogus.key=1"], 1, "bogus"),
        (["optim.lrr=1"], 1, "optim.lrr"),
        (["model.num_layerz=2"], 1, "model.num_layerz"),
        (["parallel.tensor_parallel=3"], 3, "model.num_heads"),  # tiny: 4 heads
        (["parallel.tensor_parallel=2"], 3, "world size 3"),
        (["parallel.zero_stage=4"], 1, "parallel.zero_stage"),
        (["parallel.zero_stage=0", "parallel.offload_optimizer=true"], 1, "offload_optimizer: needs ZeRO"),
        (["parallel.precision=fp8"], 1, "parallel.precision"),
        (["training.micro_batch_size=0"], 1, "training.micro_batch_size"),
        (["optim.min_lr_ratio=2"], 1, "optim.min_lr_ratio"),
        (["model.preset=huge"], 1, "huge"),
        (["data.stage=3"], 1, "data.stage"),
        (["parallel.precision=fp16"], 1, "needs GPUs"),  # these tests run on CPU
        (["init.backbone=a", "init.weights=b"], 1, "at most one"),
        (["init.optimizer=true"], 1, "init.optimizer: needs init.weights"),
        (["data.shards=[a-{0..3}.tar"], 1, "not valid YAML"),
    ],
)
def test_bad_configs_name_the_key(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        check_config(load_train_config(str(ROOT / "configs/tiny_test.yaml"), SHARDS + overrides), world)


def test_zero0_refuses_fp16():
    """Loss scaling is DeepSpeed's ZeRO/fp16 optimizers' (on a GPU: the check ahead of this one)."""
    cfg = load_train_config(
        str(ROOT / "configs/tiny_test.yaml"), SHARDS + ["parallel.zero_stage=0", "parallel.precision=fp16"]
    )
    with pytest.raises(ConfigError, match="parallel.zero_stage: 0 trains in fp32 or bf16"):
        check_config(cfg, 1, has_gpu=True)


def test_missing_shards_are_rejected():
    with pytest.raises(ConfigError, match="data.shards"):
        check_config(TrainConfig(), 1)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["optim.bogus=1"], 2, "optim.bogus"),
        (["parallel.tensor_parallel=3"], 3, "num_heads"),
        (["parallel.tensor_parallel=2"], 3, "world size 3"),
    ],
)
def test_cli_exits_2_before_starting_process_groups(tmp_path, overrides, world, message):
    # rank 0 of a world whose other ranks never come: reaching init_process_group would hang
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "DS_ACCELERATOR": "cpu",
    }
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            "--config",
            str(ROOT / "configs/tiny_test.yaml"),
            f"data.shards=[{shard}]",
            *overrides,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_lr_schedule_warms_up_then_follows_a_cosine():
    warmup, total, floor = 10, 110, 0.1
    assert lr_factor(0, warmup, total, floor) == pytest.approx(0.1)
    assert lr_factor(9, warmup, total, floor) == pytest.approx(1.0)
    for step in (10, 35, 60, 85, 110, 200):
        t = min(step - warmup, total - warmup) / (total - warmup)
        assert lr_factor(step, warmup, total, floor) == pytest.approx(
            floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2
        )


def test_weight_decay_skips_norms_biases_and_gates():
    matrix, vector = torch.zeros(4, 4), torch.zeros(4)
    assert no_weight_decay("layers.0.input_layernorm.weight", vector)
    assert no_weight_decay("layers.0.attention.dense.bias", vector)
    assert no_weight_decay("layers.1.temporal_gate", vector)
    assert no_weight_decay("final_layernorm.weight", vector)
    assert not no_weight_decay("layers.0.temporal_attention.query_key_value.weight", matrix)
    assert not no_weight_decay("frame_position_embeddings.weight", matrix)


def test_deepspeed_config_follows_the_dataclasses():
    cfg = load_train_config(str(ROOT / "configs/cogvideo_stage1.yaml"), ["training.grad_accum_steps=2"])
    ds = deepspeed_config(cfg, dp_size=4)
    assert ds["train_batch_size"] == 8 * 2 * 4
    assert (
        ds["zero_optimization"]["stage"] == 2
        and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    )
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic
    assert ds["gradient_clipping"] == 0.1
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]


def test_backbone_start_per_tp_rank_is_the_shard_of_the_full_init(tmp_path):
    from cogvideo.checkpoint.format import save_model_checkpoint
    from cogvideo.family import build_model, plain_model
    from cogvideo.models.cogvideo.config import get_preset
    from cogvideo.models.cogvideo.model import TP_PLAN, init_video_from_backbone
    from pretrain.train import initial_state

    video_cfg = get_preset("tiny")
    backbone_cfg = video_cfg.replace(stage="backbone", num_frames=1)
    torch.manual_seed(0)
    backbone = build_model(backbone_cfg).state_dict()
    save_model_checkpoint(tmp_path / "backbone", backbone, backbone_cfg)
    cfg = load_train_config(
        str(ROOT / "configs/tiny_test.yaml"), SHARDS + [f"init.backbone={tmp_path / 'backbone'}"]
    )
    full = init_video_from_backbone(backbone, video_cfg)
    assert set(full) == set(plain_model(video_cfg).state_dict())
    for rank in range(2):
        local, expected = initial_state(cfg, video_cfg, rank, 2), TP_PLAN.shard_state_dict(full, rank, 2)
        assert set(local) == set(expected)
        for name in expected:
            assert torch.equal(local[name], expected[name]), name
    assert (
        initial_state(load_train_config(str(ROOT / "configs/tiny_test.yaml"), SHARDS), video_cfg, 0, 1)
        is None
    )

"""The planner's memory model against independent references: DeepSpeed's ZeRO estimators,
the real model's parameters and TP shards, the tensors autograd saves, and the live-tensor
peak of a real CPU training step."""

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import (
    estimate_zero2_model_states_mem_needs,
    estimate_zero2_model_states_mem_needs_all_cold,
)

from benchmarks.memtrack import LiveTensorBytes
from cluster.plan_memory import (
    GiB,
    Layout,
    RankParams,
    model_states,
    plan_memory,
    rank_params,
)
from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.model import TP_PLAN
from cogvideo.models.cogvideo.planner import layer_activation_bytes
from cogvideo.params import count_parameters

DS_LAYOUTS = [(1, 1), (8, 1), (8, 13), (4, 3)]  # (GPUs per node, nodes)


def all_trainable(total: int, largest: int = 0) -> RankParams:
    return RankParams(trainable=total, frozen=0, largest_layer=largest, largest_trainable=largest)


@pytest.mark.parametrize("per_node, nodes", DS_LAYOUTS)
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_equal_deepspeeds_estimate(per_node, nodes, offload):
    total = 1_234_567_891
    layout = Layout(gpus=per_node * nodes, gpus_per_node=per_node, zero=2, offload=offload, dtype="fp16")
    ours = model_states(all_trainable(total), layout).gpu_total
    _, ds_gpu = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=offload)
    assert ours == pytest.approx(ds_gpu, abs=1)


@pytest.mark.parametrize("per_node, nodes", DS_LAYOUTS)
@pytest.mark.parametrize("offload", [False, True])
def test_zero3_model_states_equal_deepspeeds_estimate(per_node, nodes, offload):
    total, largest = 7_700_000_000, 460_830_720
    layout = Layout(gpus=per_node * nodes, gpus_per_node=per_node, zero=3, offload=offload, dtype="bf16")
    ours = model_states(all_trainable(total, largest), layout).gpu_total
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, per_node, nodes, cpu_offload=offload, cpu_offload_params=False
    )
    assert ours == pytest.approx(ds_gpu, abs=1)


def test_printed_zero2_estimate_matches_the_planner(capsys):
    """DeepSpeed's `_all_cold` helper prints GB per GPU with and without offload."""
    total, per_node, nodes = 1_818_000_000, 8, 13
    estimate_zero2_model_states_mem_needs_all_cold(total, per_node, nodes)
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if "offload_optimizer" in line]
    printed = {"cpu" in row[2]: float(row[1].strip().removesuffix("GB")) for row in rows}
    for offload in (True, False):
        layout = Layout(gpus=104, zero=2, offload=offload, dtype="fp16")
        assert model_states(all_trainable(total), layout).gpu_total / GiB == pytest.approx(
            printed[offload], abs=0.01
        )


def test_frozen_parameters_hold_only_weights():
    """DeepSpeed's estimate for the trainable part alone, plus 2 bytes per frozen weight."""
    trainable, frozen, largest = 1_818_000_000, 5_903_000_000, 460_830_720
    params = RankParams(trainable, frozen, largest, 28_000_000)
    layout = Layout(gpus=104, zero=2, dtype="fp16")
    _, ds = estimate_zero2_model_states_mem_needs(trainable, 8, 13, cpu_offload=False)
    assert model_states(params, layout).gpu_total == pytest.approx(ds + 2 * frozen, abs=1)
    z3 = model_states(params, Layout(gpus=104, zero=3, dtype="fp16"))
    _, ds3, _ = estimate_zero3_model_states_mem_needs(
        trainable, largest, 8, 13, cpu_offload=False, cpu_offload_params=False
    )
    assert z3.gpu_total == pytest.approx(ds3 + 2 * frozen / 104, abs=1)


def test_zero0_zero1_and_fp32_by_hand():
    params = RankParams(trainable=1000, frozen=3000, largest_layer=0, largest_trainable=0)
    z0 = model_states(params, Layout(gpus=8, zero=0, dtype="bf16"))
    assert (z0.weights_trainable + z0.weights_frozen, z0.gradients, z0.optimizer) == (8000, 6000, 12000)
    z1 = model_states(params, Layout(gpus=8, zero=1, dtype="bf16"))
    assert (z1.gradients, z1.optimizer) == (2000 + 4000 / 8, 12000 / 8)
    fp32 = model_states(params, Layout(gpus=1, zero=0, dtype="fp32"))
    assert (fp32.weights_trainable + fp32.weights_frozen, fp32.gradients, fp32.optimizer) == (
        16000,
        4000,
        8000,
    )
    offloaded = model_states(params, Layout(gpus=8, zero=2, offload=True, dtype="bf16"))
    assert (offloaded.gradients, offloaded.optimizer, offloaded.host) == (0, 0, 18000 / 8)


@pytest.mark.parametrize(
    "preset, changes",
    [
        ("tiny", {}),
        ("tiny-stage2", {}),
        ("small", {}),
        ("small", {"train_backbone": False}),
        ("cogvideo-stage1", {"num_layers": 2}),
        ("cogview2-6b", {"num_layers": 2}),
    ],
)
def test_rank_params_match_the_model(preset, changes):
    cfg = get_preset(preset).replace(**changes)
    counts, ours = count_parameters(cfg), rank_params(cfg, tp=1)
    assert (ours.total, ours.trainable) == (counts.total, counts.trainable)


def test_rank_params_match_tp_shards_of_a_real_state_dict():
    cfg = get_preset("small").replace(train_backbone=False)
    model = build_model(cfg)
    full = model.state_dict()
    trains = {name for name, p in model.named_parameters() if p.requires_grad}
    for tp in (2, 4):
        shard = TP_PLAN.shard_state_dict(full, rank=1, size=tp)
        ours = rank_params(cfg, tp)
        assert ours.trainable == sum(t.numel() for n, t in shard.items() if n in trains)
        assert ours.frozen == sum(t.numel() for n, t in shard.items() if n not in trains)


def test_largest_layer_follows_deepspeeds_rule():
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = get_preset("small")
    total, largest = model_to_params(build_model(cfg))
    ours = rank_params(cfg, 1)
    assert (ours.total, ours.largest_layer) == (total, largest)


def test_published_model_sizes():
    p = rank_params(get_preset("cogvideo-stage1"), 1)
    assert 7.6e9 < p.total < 7.8e9 and 1.7e9 < p.trainable < 1.85e9  # "7.7B, ~1.7-1.8B trainable"


def saved_layer_bytes(cfg, batch):
    """Bytes of the tensors autograd saves for one layer (each storage once, weights excluded)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = torch.randint(0, cfg.vocab.num_image_tokens, (batch, cfg.seq_length))
    meta = model.layout_meta(cfg.seq_length)
    pad = model._pad(tokens, meta)
    h = model._embed(tokens, meta, pad).detach().requires_grad_()
    masks = model._full_masks(meta, pad, 0.0)
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[-1](h, masks, True, False)
    return sum(saved.values())


@pytest.mark.parametrize(
    "preset, changes",
    [
        ("tiny", {}),
        ("tiny", {"train_backbone": True}),
        ("tiny-stage2", {}),
        ("small", {}),
        ("small-stage2", {"train_backbone": False}),
        ("small", {"stage": "backbone", "num_frames": 1}),
    ],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_layer_activations_match_what_autograd_saves(preset, changes, batch):
    cfg = get_preset(preset).replace(**changes)
    assert layer_activation_bytes(cfg, batch) == pytest.approx(saved_layer_bytes(cfg, batch), rel=0.01)


@pytest.mark.parametrize(
    "preset, batch, ckpt, train_backbone",
    [
        ("tiny", 4, False, None),
        ("tiny-stage2", 4, True, None),
        ("small", 2, False, False),
        ("small", 2, True, True),
    ],
)
def test_predicted_peak_of_a_cpu_step_within_15_percent(preset, batch, ckpt, train_backbone):
    cfg = get_preset(preset).replace(activation_checkpointing=ckpt)
    if train_backbone is not None:
        cfg = cfg.replace(train_backbone=train_backbone)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, cfg.vocab.num_image_tokens, (batch, cfg.seq_length))
    with LiveTensorBytes() as mem:
        mem.track_all(model.parameters())
        for step in range(2):
            model.loss(model(tokens), tokens, torch.ones_like(tokens, dtype=torch.bool)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0:
                mem.reset_peak()
    layout = Layout(gpus=1, gpus_per_node=1, zero=0, micro_batch=batch, act_ckpt=ckpt, dtype="fp32")
    assert plan_memory(cfg, layout, context_bytes=0).peak == pytest.approx(mem.peak, rel=0.15)


def test_live_tensor_bytes_counts_allocations_and_frees():
    with LiveTensorBytes() as mem:
        a = torch.zeros(1000)
        b = a.view(10, 100)  # same storage: counted once
        c = torch.ones(500, dtype=torch.float64)
        assert mem.live == 4000 + 4000
        del a, b
        assert mem.live == 4000
        del c
    assert (mem.live, mem.peak) == (0, 8000)

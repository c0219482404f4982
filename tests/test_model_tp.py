"""Tensor parallelism: one TP plan (cogvideo.model.TP_PLAN) drives both the model and checkpoint
resharding. At TP 4 and at TP 2 (x DP 2) over four gloo processes, `parallelize` leaves each rank holding exactly
`TP_PLAN.shard_state_dict` of the plain weights, and that model equals TP=1 on the same weights
(logits, loss and every gradient merged back by `TP_PLAN.merge_state_dicts`, fp32)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from megatron.core import parallel_state

from cogvideo import parallel
from cogvideo.config import get_preset
from cogvideo.model import TP_PLAN, CogVideoModel
from cogvideo.sequence import build_sequence
from cogvideo.tp_plan import parallelize

pytestmark = pytest.mark.slow
TP_DEGREES = (4, 2)


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for text_len in (3, cfg.text_length):
        text = torch.randint(
            cfg.vocab.text_offset, cfg.vocab.text_offset + cfg.vocab.num_text_tokens, (text_len,), generator=g
        )
        frames = torch.randint(
            0, cfg.vocab.num_image_tokens, (cfg.num_frames, cfg.frame_tokens, cfg.frame_tokens), generator=g
        )
        samples.append(build_sequence(cfg, text, frames))
    return [torch.stack(x) for x in zip(*samples)]


def _configs():
    """Stage 1 plain, stage 2 with activation checkpointing (applied by the same parallelize step)."""
    return [
        get_preset("tiny").replace(num_layers=2, train_backbone=True),
        get_preset("tiny-stage2").replace(num_layers=2, train_backbone=True, activation_checkpointing=True),
    ]


def _run(model, cfg, text_bias=0.0):
    model.train()
    tokens, targets, mask = _batch(cfg)
    logits = model(tokens, text_bias=text_bias)
    loss = model.loss(logits, targets, mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _plain(cfg, state):
    model = CogVideoModel(cfg)
    model.load_state_dict(state)
    return model


def _worker(rank, port, states, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    for tp in TP_DEGREES:  # TP 4, then TP 2 x DP 2 in the same processes
        parallel.init_distributed(tensor_parallel=tp, backend="gloo")
        tp_rank, group = parallel.tp_rank(), parallel.tp_group()
        results = []
        for cfg, full in zip(_configs(), states):
            model = parallelize(_plain(cfg, full), TP_PLAN, cfg.activation_checkpointing)
            local = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
            expected = TP_PLAN.shard_state_dict(full, tp_rank, tp)
            assert set(local) == set(expected)
            for name in expected:  # the layers hold exactly the plan's checkpoint shard
                assert torch.equal(local[name], expected[name]), name
            for name, param in model.named_parameters():  # marked as megatron would: DeepSpeed's grad
                rule = TP_PLAN.rule(name)  # norm counts split parameters on every TP rank
                assert getattr(param, "tensor_model_parallel", False) == (rule is not None), name
                assert rule is None or (param.partition_dim, param.partition_stride) == rule, name
            logits, loss, grads = _run(model, cfg, text_bias=1.4)
            gathered = [torch.empty_like(logits) for _ in range(tp)]
            torch.distributed.all_gather(gathered, logits.contiguous(), group=group)
            all_grads = [None] * tp
            torch.distributed.all_gather_object(all_grads, grads, group=group)
            results.append((torch.cat(gathered, -1), loss, TP_PLAN.merge_state_dicts(all_grads)))
        if rank == 0:
            torch.save(results, os.path.join(out_dir, f"tp{tp}.pt"))
        parallel_state.destroy_model_parallel()
    parallel.destroy()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp_matches_tp1(tmp_path):
    states = []
    for cfg in _configs():
        torch.manual_seed(0)
        model = CogVideoModel(cfg)
        with torch.no_grad():  # make the gates and biases non-trivial so their grads mean something
            for name, p in model.named_parameters():
                if name.endswith("bias") or name.endswith("temporal_gate"):
                    p.normal_(std=0.1)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    mp.spawn(_worker, args=(_free_port(), states, str(tmp_path)), nprocs=4, join=True)
    for tp in TP_DEGREES:
        results = torch.load(tmp_path / f"tp{tp}.pt", weights_only=True)
        for cfg, full, (logits_tp, loss_tp, grads_tp) in zip(_configs(), states, results):
            plain = _plain(cfg.replace(activation_checkpointing=False), full)
            logits1, loss1, grads1 = _run(plain, cfg, text_bias=1.4)
            torch.testing.assert_close(logits_tp, logits1, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loss_tp, loss1, atol=1e-5, rtol=1e-5)
            assert set(grads_tp) == set(grads1)
            for name in grads1:
                torch.testing.assert_close(
                    grads_tp[name],
                    grads1[name],
                    atol=1e-5,
                    rtol=1e-4,
                    msg=lambda m: f"TP={tp} {cfg.stage} {name}: {m}",
                )

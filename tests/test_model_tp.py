"""Tensor parallelism: one TP plan (cogvideo.models.cogvideo.model.TP_PLAN) drives both the model and checkpoint
resharding. At TP 4 and at TP 2 (x DP 2) over four gloo processes, the model `build_model`
parallelizes takes `TP_PLAN.shard_state_dict` of the plain weights as its state dict, its split
parameters are marked as megatron marks them, and it equals TP=1 on the same weights (logits, loss
and every gradient merged back by `TP_PLAN.merge_state_dicts`, fp32). That a seeded build holds
the TP=1 weights sliced is tests/test_model_build.py."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from megatron.core import parallel_state
from model_helpers import random_batch

from cogvideo import parallel
from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.model import TP_PLAN
from pretrain.launch import free_port

pytestmark = pytest.mark.slow
TP_DEGREES = (4, 2)


def _configs():
    """Stage 1 plain, stage 2 with activation checkpointing (applied by the same parallelize step)."""
    return [
        get_preset("tiny").replace(num_layers=2, train_backbone=True),
        get_preset("tiny-stage2").replace(num_layers=2, train_backbone=True, activation_checkpointing=True),
    ]


def _run(model, cfg, text_bias=0.0):
    model.train()
    tokens, targets, mask = random_batch(cfg)
    logits = model(tokens, text_bias=text_bias)
    loss = model.loss(logits, targets, mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _loaded(cfg, full):
    """The model as training builds it at the current TP degree, holding this rank's shard of `full`."""
    model = build_model(cfg, init_weights=False)
    model.load_state_dict(TP_PLAN.shard_state_dict(full, parallel.tp_rank(), parallel.tp_size()))
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
            model = _loaded(cfg, full)
            local = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
            expected = TP_PLAN.shard_state_dict(full, tp_rank, tp)
            assert set(local) == set(expected)
            for name in expected:  # the layers take exactly the plan's checkpoint shard
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
        if tp == TP_DEGREES[0]:  # planted: the column-parallel layers skip their input-gradient all-reduce
            model = _loaded(_configs()[0], states[0])
            for module in model.modules():
                if hasattr(module, "allreduce_dgrad"):
                    module.allreduce_dgrad, module.disable_grad_reduce = False, True
            all_grads = [None] * tp
            torch.distributed.all_gather_object(all_grads, _run(model, _configs()[0], 1.4)[2], group=group)
            results.append(TP_PLAN.merge_state_dicts(all_grads))
        if rank == 0:
            torch.save(results, os.path.join(out_dir, f"tp{tp}.pt"))
        parallel_state.destroy_model_parallel()
    parallel.destroy()


def test_tp_matches_tp1(tmp_path):
    states = []
    for cfg in _configs():
        torch.manual_seed(0)
        model = build_model(cfg)
        with torch.no_grad():  # make the gates and biases non-trivial so their grads mean something
            for name, p in model.named_parameters():
                if name.endswith("bias") or name.endswith("temporal_gate"):
                    p.normal_(std=0.1)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    mp.spawn(_worker, args=(free_port(), states, str(tmp_path)), nprocs=4, join=True)
    for tp in TP_DEGREES:
        results = torch.load(tmp_path / f"tp{tp}.pt", weights_only=True)
        for cfg, full, (logits_tp, loss_tp, grads_tp) in zip(_configs(), states, results):
            plain = _loaded(cfg.replace(activation_checkpointing=False), full)
            logits1, loss1, grads1 = _run(plain, cfg, text_bias=1.4)
            torch.testing.assert_close(logits_tp, logits1, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loss_tp, loss1, atol=1e-5, rtol=1e-5)
            assert_every_gradient_close(grads_tp, grads1, f"TP={tp} {cfg.stage}")
            if tp == TP_DEGREES[0] and cfg.stage == "stage1":
                with pytest.raises(AssertionError, match="planted"):  # the missing all-reduce
                    assert_every_gradient_close(results[-1], grads1, "planted")


def assert_every_gradient_close(grads_tp: dict, grads1: dict, what: str) -> None:
    """Each gradient tensor on its own (fp32, reduction order only): a wrong shard or a missing
    reduction shows in the tensor it touches, however small against the others."""
    assert set(grads_tp) == set(grads1)
    for name in grads1:
        torch.testing.assert_close(
            grads_tp[name], grads1[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{what} {name}: {m}"
        )


# ---- dropout under TP --------------------------------------------------------------------

DROPOUT = dict(train_backbone=True, hidden_dropout=0.1, attention_dropout=0.1)


def _gather(tensor, group):
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def _attention_masks(group):
    """The dropout masks `attend` applies to this rank's heads: with v the identity, its output
    is the dropped attention probabilities. Returns them and torch's generator state before and
    after, each gathered over the TP group."""
    from cogvideo.models.cogvideo.attention import attend

    g = torch.Generator().manual_seed(3)  # the same queries and keys on both ranks
    q, k = torch.randn(2, 1, 2, 8, 8, generator=g)
    v = torch.eye(8).expand(1, 2, 8, 8)
    before = torch.get_rng_state()
    dropped = attend(q, k, v, torch.ones(8, 8, dtype=torch.bool), dropout=0.5) != 0
    return _gather(dropped, group), _gather(before, group), _gather(torch.get_rng_state(), group)


def _train_step_with_dropout(cfg, full, ckpt: bool, group):
    """One forward and backward at TP=2 with dropout on, with or without recomputation: this
    rank's gradients and model-parallel RNG state after it, and every replicated hidden state
    (after embedding dropout, after each layer) gathered over the TP group."""
    model = _loaded(cfg.replace(activation_checkpointing=ckpt), full)
    hidden = []
    for module in [model.embedding_dropout, *model.layers]:
        module.register_forward_hook(lambda _m, _i, out: hidden.append(out.detach().clone()))
    parallel.manual_seed(1)
    _, loss, grads = _run(model, cfg)
    replicated = [_gather(h, group) for h in hidden[: 1 + cfg.num_layers]]  # first forward only
    tracker = parallel.model_parallel_rng_states()["cpu"][parallel.MODEL_PARALLEL_RNG]
    return {
        "loss": loss,
        "grads": grads,
        "tracker": tracker,
        "torch": torch.get_rng_state(),
        "hidden": replicated,
    }


def _dropout_worker(rank, port, full, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    parallel.init_distributed(tensor_parallel=2, backend="gloo")
    group = parallel.tp_group()
    parallel.manual_seed(0)
    masks = _attention_masks(group)
    cfg = get_preset("tiny-stage2").replace(num_layers=2, **DROPOUT)
    steps = [_train_step_with_dropout(cfg, full, ckpt, group) for ckpt in (False, True)]
    torch.save({"masks": masks, "steps": steps}, os.path.join(out_dir, f"dropout_rank{rank}.pt"))
    parallel.destroy()


def test_tp2_attention_dropout_draws_per_rank_and_recomputation_replays_it(tmp_path):
    """At TP=2 each rank's heads get their own attention-dropout masks (megatron's model-parallel
    RNG state, CPU tracker here), while dropout on the replicated activations keeps drawing alike
    on both ranks; activation checkpointing recomputes with the same masks: gradients, loss and
    both RNG streams equal those of the run without recomputation, bit for bit."""
    torch.manual_seed(0)
    full = build_model(get_preset("tiny-stage2").replace(num_layers=2, **DROPOUT)).state_dict()
    mp.spawn(_dropout_worker, args=(free_port(), full, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"dropout_rank{r}.pt", weights_only=True) for r in range(2)]
    masks, before, after = ranks[0]["masks"]
    assert not torch.equal(masks[0], masks[1])  # the same queries and keys, each rank's own masks
    assert torch.equal(before[0], before[1]) and torch.equal(after[0], before[0])  # torch's stream untouched
    assert 0.3 < masks.float().mean() < 0.7  # dropout 0.5 did drop
    for out in ranks:
        plain, recomputed = out["steps"]
        for gathered in plain["hidden"] + recomputed["hidden"]:
            assert torch.equal(gathered[0], gathered[1])  # replicated activations: the same masks
        assert torch.equal(plain["loss"], recomputed["loss"])
        assert all(torch.equal(plain["grads"][n], recomputed["grads"][n]) for n in plain["grads"])
        assert torch.equal(plain["tracker"], recomputed["tracker"])
        assert torch.equal(plain["torch"], recomputed["torch"])
    assert not torch.equal(ranks[0]["steps"][0]["tracker"], ranks[1]["steps"][0]["tracker"])

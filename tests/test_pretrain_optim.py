"""The optimizer the trainer hands DeepSpeed at ZeRO stage 0 (pretrain.optim.GuardedAdamW), against
torch's own clip_grad_norm_ + AdamW: the same update, a non-finite step skipped, and the global
norm over tensor-parallel ranks counting each shard once and each replicated parameter once."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from process_helpers import torchrun_self

from pretrain.optim import GuardedAdamW

CLIP = 0.5
ADAMW = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "fused": True}


def named_params(seed: int, dtype=torch.float64) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Two groups (decayed matrices, undecayed vectors) of named parameters, and the parameters
    by name, with gradients whose global norm is far above CLIP (clipping acts)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (8, 4), "b.weight": (3, 5), "a.bias": (8,), "norm.weight": (4,)}
    params = {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape in shapes.items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
    groups = [
        {"params": [(n, params[n]) for n in ("a.weight", "b.weight")]},
        {"params": [(n, params[n]) for n in ("a.bias", "norm.weight")], "weight_decay": 0.0},
    ]
    return groups, params


def test_one_step_equals_torch_clip_then_adamw():
    groups, ours = named_params(0)
    guarded = GuardedAdamW(groups, clip=CLIP, **ADAMW)
    groups, theirs = named_params(0)
    reference = torch.optim.AdamW([{**g, "params": [p for _, p in g["params"]]} for g in groups], **ADAMW)
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)  # this step's gradients, alike on both sides
        for name, param in ours.items():
            param.grad = torch.randn(param.shape, generator=g, dtype=torch.float64)
            theirs[name].grad = param.grad.clone()
        norm = torch.nn.utils.clip_grad_norm_(list(theirs.values()), CLIP)
        reference.step()
        guarded.step()
        assert guarded._global_grad_norm == pytest.approx(float(norm), rel=1e-12)
        assert not guarded.overflow and guarded._global_grad_norm > 10 * CLIP  # clipping acted
    for name, param in ours.items():
        torch.testing.assert_close(param, theirs[name], rtol=1e-12, atol=0, msg=name)
    saved = guarded.state_dict()["param_groups"]  # the checkpoint names whose moments are whose
    assert [g["param_names"] for g in saved] == [["a.weight", "b.weight"], ["a.bias", "norm.weight"]]


def test_bf16_model_steps_its_fp32_master_weights():
    """With master_weights: fp32 copies taken at construction are stepped (on the bf16 model's
    gradients, in fp32) exactly as torch steps fp32 parameters, and written back to the model."""
    groups, model = named_params(2, torch.float32)
    guarded = GuardedAdamW(groups, clip=CLIP, master_weights=True, **ADAMW)
    for param in model.values():  # as pretrain.engines casts the module once the optimizer holds its masters
        param.data = param.data.to(torch.bfloat16)
    groups, masters = named_params(2, torch.float32)
    reference = torch.optim.AdamW([{**g, "params": [p for _, p in g["params"]]} for g in groups], **ADAMW)
    for step in range(3):
        g = torch.Generator().manual_seed(200 + step)
        for name, param in model.items():
            param.grad = torch.randn(param.shape, generator=g).to(torch.bfloat16)
            masters[name].grad = param.grad.float()
        torch.nn.utils.clip_grad_norm_(list(masters.values()), CLIP)
        reference.step()
        guarded.step()
    for name, param in model.items():
        master = guarded.masters[list(model).index(name)]
        torch.testing.assert_close(master, masters[name], msg=name)  # fp32 rounding of the clip factor
        assert param.dtype == torch.bfloat16 and torch.equal(param, master.to(torch.bfloat16)), name
        assert master.grad is None  # the fp32 gradients live for the step only
    saved = guarded.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(saved["master_weights"], guarded.masters))

    groups, fresh = named_params(3, torch.float32)  # other values: a resumed run's start
    resumed = GuardedAdamW(groups, clip=CLIP, master_weights=True, **ADAMW)
    for param in fresh.values():
        param.data = param.data.to(torch.bfloat16)
    resumed.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(resumed.masters, guarded.masters))
    assert all(torch.equal(fresh[name], model[name]) for name in model)
    groups, _ = named_params(3, torch.float32)
    with pytest.raises(
        ValueError, match="with fp32 master weights, for an optimizer that does not keep them"
    ):
        GuardedAdamW(groups, clip=CLIP, **ADAMW).load_state_dict(saved)


class Unguarded(GuardedAdamW):
    """Planted: the norm is computed but a non-finite step is taken anyway."""

    def step(self, closure=None):
        self._global_grad_norm = self.grad_norm().item()
        return torch.optim.AdamW.step(self, closure)


def assert_nonfinite_step_skipped(optimizer_class) -> None:
    groups, named = named_params(1)
    optimizer = optimizer_class(groups, clip=CLIP, **ADAMW)
    params = list(named.values())
    before = [p.detach().clone() for p in params]
    params[2].grad[3] = float("nan")
    optimizer.step()
    assert optimizer.overflow and not math.isfinite(optimizer._global_grad_norm)
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "a non-finite step moved the weights"
    assert not optimizer.state, "a non-finite step created Adam moments"
    params[2].grad[3] = 0.0
    optimizer.step()
    assert not optimizer.overflow and all(not torch.equal(p, b) for p, b in zip(params, before))


def test_a_nonfinite_step_is_skipped():
    assert_nonfinite_step_skipped(GuardedAdamW)


def test_planted_unguarded_step_fails_the_check():
    with pytest.raises(AssertionError):
        assert_nonfinite_step_skipped(Unguarded)


@pytest.mark.slow
def test_global_norm_over_tensor_parallel_ranks(tmp_path):
    """Two TP ranks: a sharded parameter (different on each) and a replicated one (the same):
    the norm is that of both shards and one copy of the replica. Marking the replica sharded
    (counted twice) or leaving out the TP group (each rank's own norm) must miss it."""
    torchrun_self(__file__, [str(tmp_path)], timeout=120)
    norms = json.loads((tmp_path / "norms.json").read_text())
    expected = math.sqrt(sum(v * v for v in (1.0, 2.0)) * 6 + 3.0**2 * 4)  # shards 6 elements, replica 4
    assert norms["guarded"] == pytest.approx(expected, rel=1e-12)
    assert norms["replica_marked_sharded"] != pytest.approx(expected, rel=1e-3)
    assert norms["without_tp_group"] != pytest.approx(expected, rel=1e-3)


def _norm_worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def norm(replica_sharded: bool = False, group=dist.group.WORLD) -> float:
        shard = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        shard.grad = torch.full((6,), float(rank + 1), dtype=torch.float64)
        shard.tensor_model_parallel = True
        replica = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        replica.grad = torch.full((4,), 3.0, dtype=torch.float64)
        replica.tensor_model_parallel = replica_sharded
        optimizer = GuardedAdamW([shard, replica], clip=0.0, tp_group=group, lr=1e-3)
        return float(optimizer.grad_norm())

    norms = {
        "guarded": norm(),
        "replica_marked_sharded": norm(replica_sharded=True),
        "without_tp_group": norm(group=None),
    }
    if rank == 0:
        (out / "norms.json").write_text(json.dumps(norms))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _norm_worker(Path(sys.argv[1]))

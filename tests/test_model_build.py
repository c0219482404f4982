"""The one way a model is built (`cogvideo.family.build_model`, torchtitan's order): the plain
model on the meta device, the TP plan applied there, then this rank's shards allocated and
initialised one full parameter at a time. Held here: the initialisation is the published one,
a seeded TP=2 build holds exactly the TP=1 weights sliced by the plan (both families), and the
build never holds more than this rank's shards plus one full parameter."""

import ast
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_model_family import MaskedVideoConfig
from torch import nn

from benchmarks.memtrack import LiveTensorBytes
from cogvideo import parallel
from cogvideo.family import build_model, families, family_of, plain_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.model import TP_PLAN
from cogvideo.tp_plan import parallelize
from pretrain.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
OUTPUT_PROJECTIONS = ("attention.dense", "temporal_attention.dense", "mlp.dense_4h_to_h")


def _configs():
    """CogVideo stage 2 (backbone frozen) and the toy masked-token family, each large enough that
    one full copy of the model exceeds the memory bound of the TP=2 build below."""
    return [
        get_preset("tiny-stage2").replace(num_layers=4, hidden_size=128),
        MaskedVideoConfig(num_layers=4),
    ]


def _expected_std(cfg, module: nn.Module, module_name: str, kind: str) -> float | None:
    """CogView2's / SAT's initialisation, stated by module type: None for exact ones / zeros."""
    if isinstance(module, nn.LayerNorm) or kind in ("bias", "temporal_gate"):
        return None
    if isinstance(module, nn.Linear) and module_name.split(".", 2)[-1] in OUTPUT_PROJECTIONS:
        return cfg.init_std / math.sqrt(2 * cfg.num_layers)  # scaled output projections
    assert isinstance(module, (nn.Linear, nn.Embedding)), module_name
    return cfg.init_std


def test_the_initialisation_is_the_published_one():
    cfg = get_preset("tiny-stage2").replace(num_layers=4, hidden_size=64)
    plain = plain_model(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    for name, param in model.named_parameters():
        module_name, _, kind = name.rpartition(".")
        module = plain.get_submodule(module_name) if kind != "temporal_gate" else None
        std = _expected_std(cfg, module, module_name, kind)
        value = param.detach().double()
        if std is None:
            one = isinstance(module, nn.LayerNorm) and kind == "weight"
            assert torch.equal(value, torch.full_like(value, float(one))), name
            continue
        n = value.numel()  # sample mean and std within 5 standard errors of the drawn normal's
        assert abs(float(value.mean())) < 5 * std / math.sqrt(n), name
        assert abs(float(value.std()) / std - 1) < 5 / math.sqrt(2 * n), name


def test_a_tp1_build_holds_the_model_and_nothing_else():
    with LiveTensorBytes() as mem:
        model = build_model(_configs()[0])
    assert mem.peak == sum(p.nbytes for p in model.parameters())  # drawn in place, no copies


def test_parallelize_refuses_a_model_that_is_not_on_the_meta_device(monkeypatch):
    model = build_model(get_preset("tiny"))
    monkeypatch.setattr(parallel, "tp_size", lambda: 2)
    with pytest.raises(ValueError, match="word_embeddings holds cpu weights; parallelize a model built on"):
        parallelize(model, TP_PLAN)


def test_nothing_else_builds_a_model():
    """No second builder: outside cogvideo/family.py no code constructs a family's plain model
    class or calls a family's `build_model` (the meta model for shapes is `plain_model`)."""
    classes = {family.build_model.__name__ for family in families()}
    assert {"CogVideoModel", "MaskedVideoModel"} <= classes
    found = []
    for top in ("cogvideo", "pretrain", "cluster", "demo", "benchmarks", "data_prep", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path == ROOT / "cogvideo" / "family.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                func = getattr(node, "func", None)
                if (isinstance(func, ast.Name) and func.id in classes) or (
                    isinstance(func, ast.Attribute) and func.attr == "build_model"
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"build models with cogvideo.family.build_model (or plain_model): {found}"


def _worker(rank, port, fulls, trainable):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    parallel.init_distributed(tensor_parallel=2, backend="gloo")
    for cfg, full, trains in zip(_configs(), fulls, trainable):
        plan = family_of(cfg).tp_plan
        parallel.manual_seed(SEED)
        with LiveTensorBytes() as mem:
            model = build_model(cfg)
        expected = plan.shard_state_dict(full, rank, 2)
        params = dict(model.named_parameters())
        state = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        assert set(params) == state == set(expected), cfg.name
        for name, param in params.items():
            assert param.dtype == expected[name].dtype and torch.equal(param, expected[name]), name
            assert param.requires_grad == (name in trains), name
            rule = plan.rule(name)  # megatron's marks survive the allocation (DeepSpeed's grad norm)
            assert getattr(param, "tensor_model_parallel", False) == (rule is not None), name
            assert rule is None or (param.partition_dim, param.partition_stride) == rule, name
        # The build allocates this rank's shards (to_empty), then holds one full split parameter at
        # a time while it is drawn and sliced into its shard (torch.cat(out=): no further copy;
        # replicated ones are drawn in place). Nothing else is allocated, so the bound has no slack;
        # a build that first made the plain model whole would hold all of `full` (asserted to
        # exceed the bound, so the check means something).
        shard_bytes = sum(p.nbytes for p in params.values())
        bound = shard_bytes + max(t.nbytes for t in full.values())
        assert mem.peak <= bound, f"{cfg.name}: the build held {mem.peak} bytes, over {bound}"
        assert sum(t.nbytes for t in full.values()) > bound
    parallel.destroy()


@pytest.mark.slow
def test_tp2_builds_hold_the_tp1_weights_sliced_and_never_a_full_model():
    fulls, trainable = [], []
    for cfg in _configs():
        torch.manual_seed(SEED)
        model = build_model(cfg)
        fulls.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        trainable.append({n for n, p in model.named_parameters() if p.requires_grad})
    assert trainable[0] and len(trainable[0]) < len(fulls[0])  # some frozen: requires_grad is carried
    mp.spawn(_worker, args=(free_port(), fulls, trainable), nprocs=2, join=True)

"""The TP plan table (cogvideo.models.cogvideo.model.TP_PLAN) against an independent statement of the split of
every parameter, resharding round trips at TP 2 and 4, and what `parallelize` does without TP."""

import pytest
import torch
from model_helpers import random_batch
from torch import nn

from cogvideo.family import build_model, plain_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.model import TP_PLAN
from cogvideo.tp_plan import Column, Row, TPPlan, parallelize


def _expected_rule(name: str):
    """The split of each full parameter as docs/architecture.md states it, written out by hand."""
    if name == "word_embeddings.weight":
        return (0, 1)
    if ".query_key_value." in name:
        return (0, 3)
    if ".dense_h_to_4h." in name:
        return (0, 1)
    if name.endswith(
        (".attention.dense.weight", ".temporal_attention.dense.weight", ".dense_4h_to_h.weight")
    ):
        return (1, 1)
    return None


@pytest.mark.parametrize("preset", ["tiny", "tiny-stage2", "cogview2-6b"])
def test_plan_rules_match_the_documented_splits(preset):
    names = list(plain_model(get_preset(preset).replace(num_layers=2)).state_dict())
    assert any(".query_key_value." in n for n in names)
    for name in names:
        assert TP_PLAN.rule(name) == _expected_rule(name), name


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_then_merge_is_the_identity_and_qkv_shards_hold_whole_heads(tp):
    torch.manual_seed(0)
    cfg = get_preset("tiny-stage2")
    full = build_model(cfg).state_dict()
    shards = [TP_PLAN.shard_state_dict(full, rank, tp) for rank in range(tp)]
    merged = TP_PLAN.merge_state_dicts(shards)
    assert set(merged) == set(full)
    for name in full:
        assert torch.equal(merged[name], full[name]), name
    qkv = full["layers.1.temporal_attention.query_key_value.weight"]
    q, k, v = qkv.chunk(3)
    for rank, shard in enumerate(shards):  # rank r holds [Q_r; K_r; V_r]: its own heads of each
        expected = torch.cat([part.chunk(tp)[rank] for part in (q, k, v)])
        assert torch.equal(shard["layers.1.temporal_attention.query_key_value.weight"], expected)
        assert torch.equal(
            shard["layers.0.mlp.dense_4h_to_h.weight"],
            full["layers.0.mlp.dense_4h_to_h.weight"].chunk(tp, dim=1)[rank],
        )
        assert torch.equal(shard["layers.0.mlp.dense_4h_to_h.bias"], full["layers.0.mlp.dense_4h_to_h.bias"])


def test_a_split_that_does_not_divide_names_the_parameter():
    full = {"layers.0.attention.query_key_value.weight": torch.zeros(3 * 10, 10)}
    with pytest.raises(ValueError, match="layers.0.attention.query_key_value.weight"):
        TP_PLAN.shard_state_dict(full, 0, 4)


def test_suffixes_match_whole_module_names():
    plan = TPPlan({"attention.dense": Row(), "qkv": Column(stride=3)})
    assert plan.rule("layers.0.attention.dense.weight") == (1, 1)
    assert plan.rule("layers.0.temporal_attention.dense.weight") is None  # not a whole-part match
    assert plan.rule("layers.0.attention.dense.bias") is None  # a row split keeps the bias whole
    assert plan.rule("blocks.3.qkv.bias") == (0, 3)


def test_parallelize_without_tp_keeps_names_and_checkpoints_the_blocks():
    cfg = get_preset("tiny").replace(train_backbone=True)
    torch.manual_seed(0)
    plain = build_model(cfg)
    reference = {k: v.clone() for k, v in plain.state_dict().items()}
    model = parallelize(plain, TP_PLAN, activation_checkpointing=True)
    assert model is plain and isinstance(model.layers[0].attention.query_key_value, nn.Linear)
    assert list(model.state_dict()) == list(reference)  # checkpointing leaves state dict keys alone
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model.train()(random_batch(cfg)[0]).sum().backward()
    checkpointed = len(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        build_model(cfg).train()(random_batch(cfg)[0]).sum().backward()
    assert checkpointed < len(saved) / 2  # only block inputs (and the head) are kept for backward


def test_activation_checkpointing_needs_the_plans_blocks():
    with pytest.raises(ValueError, match="blocks"):
        parallelize(plain_model(get_preset("tiny")), TPPlan(TP_PLAN.styles), activation_checkpointing=True)

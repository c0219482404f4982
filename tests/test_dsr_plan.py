"""DSR in the planner and `cogvideo-params`: the published preset counted on the meta device, the
activations one layer keeps against what autograd saves, the peak of a real CPU training step
against the plan, and `cogvideo-plan` for a DSR run."""

from __future__ import annotations

import pytest
import torch

from benchmarks.memtrack import LiveTensorBytes
from cluster.plan import main as plan_main
from cluster.plan_memory import Layout, plan_memory
from cogvideo.family import any_preset, build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.dsr.layout import text_pads
from cogvideo.models.dsr.model import high_res_loss
from cogvideo.models.dsr.planner import layer_activation_bytes
from cogvideo.params import count_parameters
from cogvideo.params import main as params_main


def test_the_published_preset_is_the_backbone_plus_dsrs_parameters(capsys):
    dsr, backbone = any_preset("cogview2-dsr"), get_preset("cogview2-6b")
    h, layers = dsr.hidden_size, dsr.num_layers
    added = layers * (4 * h * h + 4 * h) + 3600 * h  # per layer QKV + dense (with biases), the table
    counts, base = count_parameters(dsr), count_parameters(backbone)
    assert (counts.total, counts.trainable) == (base.total + added, added) == (7_725_895_680, 1_823_588_352)
    params_main(["cogview2-dsr"])
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[0] == "cogview2-dsr" and row[-5:-3] == ["7,725,895,680", "1,823,588,352"]


def saved_layer_bytes(cfg, batch: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one DsrLayer's forward."""
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu").train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = torch.randint(0, cfg.vocab.num_image_tokens, (batch, cfg.seq_length))
    context = model._context(text_pads(cfg, tokens))
    h = torch.randn(batch, cfg.seq_length, cfg.hidden_size, requires_grad=True)
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[-1](h, context)
    return sum(saved.values())


@pytest.mark.parametrize(
    "preset, changes, batch",
    [
        ("dsr-tiny", {}, 1),
        ("dsr-tiny", {}, 2),
        ("dsr-small", {}, 2),
        ("dsr-tiny", {"train_backbone": True}, 2),
    ],
)
def test_layer_activations_match_what_autograd_saves(preset, changes, batch):
    cfg = any_preset(preset).replace(**changes)
    assert layer_activation_bytes(cfg, batch) == pytest.approx(saved_layer_bytes(cfg, batch), rel=0.01)


@pytest.mark.parametrize("batch, ckpt", [(2, False), (2, True)])
def test_predicted_peak_of_a_cpu_step_within_15_percent(batch, ckpt):
    cfg = any_preset("dsr-tiny").replace(activation_checkpointing=ckpt, hidden_size=64)
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu").train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, cfg.vocab.num_image_tokens, (batch, cfg.seq_length))
    targets = torch.randint(0, cfg.vocab.num_image_tokens, (batch, cfg.high_tokens))
    with LiveTensorBytes() as mem:
        mem.track_all(model.parameters())
        for step in range(2):
            high_res_loss(cfg, model(tokens), targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0:
                mem.reset_peak()
    layout = Layout(gpus=1, gpus_per_node=1, zero=0, micro_batch=batch, act_ckpt=ckpt, dtype="fp32")
    assert plan_memory(cfg, layout, context_bytes=0).peak == pytest.approx(mem.peak, rel=0.15)


def test_cogvideo_plan_plans_a_dsr_run_from_the_backbone(capsys):
    argv = ["model.family=dsr", "model.preset=cogview2-dsr", "init.backbone=cogview2", "--gpus", "8"]
    plan_main(
        [*argv, "parallel.zero_stage=2", "training.micro_batch_size=4", "model.activation_checkpointing=true"]
    )
    out = capsys.readouterr().out
    assert out.startswith("cogview2-dsr (dsr): 48 layers") and "60^2 high-res" in out
    assert "7.726B (1.824B trainable, 5.902B frozen)" in out and "of 80 GiB: fits" in out

"""cogvideo.models.cogvideo.flops against a hand count and against torch's own FLOP counter run on the real
model (SDPA forced to its math form so the attention products are visible to the counter)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cogvideo.family import build_model
from cogvideo.models.cogvideo import flops
from cogvideo.models.cogvideo.config import get_preset


def test_tiny_stage1_by_hand():
    cfg = get_preset("tiny")  # 2 layers, hidden 32, FFN 128, vocab 192, text 8 + 5 frames x 16
    assert (cfg.seq_length, cfg.hidden_size, cfg.ffn_size, cfg.vocab.vocab_size) == (88, 32, 128, 192)
    assert not cfg.train_backbone
    L, h = 88, 32
    qkv_dense = 2 * L * h * 3 * h + 2 * L * h * h  # one channel's projections
    mlp = 2 * L * h * 128 * 2
    spatial_pairs = 8 * 8 + 5 * 16 * (8 + 16)  # text causal block + each frame x (text + frame)
    temporal_pairs = 5 * 16 * 88  # frame queries x whole sequence
    attn = 4 * h * (spatial_pairs + temporal_pairs)  # QK^T and PV
    logits = 2 * L * h * 192
    forward = 2 * (2 * qkv_dense + mlp + attn) + logits
    # frozen backbone: input gradients only; temporal channel: input + weight; attention: 2x
    backward = 2 * (qkv_dense + mlp + 2 * qkv_dense + 2 * attn) + logits
    assert forward == 9_158_656
    assert flops.forward_flops(cfg) == forward
    assert flops.train_flops(cfg, batch=3) == 3 * (forward + backward)
    assert flops.recompute_flops(cfg) == 0
    assert flops.recompute_flops(cfg.replace(activation_checkpointing=True), 2) == 2 * (forward - logits)


def test_stage2_window_pairs_by_hand():
    cfg = get_preset("tiny-stage2")  # window 2 x 2 positions x 5 frames
    spatial, temporal = flops.attention_pairs(cfg)
    assert spatial == 8 * 8 + 5 * 16 * (8 + 16)
    assert temporal == 5 * 16 * (8 + 5 * 2 * 2)


def counted(cfg, batch=2):
    """(forward, backward) FLOPs torch counts on the real model."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    tokens = torch.randint(0, cfg.vocab.num_image_tokens, (batch, cfg.seq_length))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            logits = model(tokens)
        with FlopCounterMode(display=False) as backward:
            logits.float().sum().backward()
    return forward.get_total_flops(), backward.get_total_flops()


@pytest.mark.parametrize(
    "preset, changes",
    [
        ("tiny", {}),
        ("tiny", {"train_backbone": True}),
        ("tiny-stage2", {}),
        ("tiny-stage2", {"train_backbone": True, "num_layers": 3}),
        ("small", {"stage": "backbone", "num_frames": 1}),
        ("small-stage2", {"train_backbone": False, "activation_checkpointing": True}),
    ],
)
def test_matches_torch_flop_counter(preset, changes):
    cfg = get_preset(preset).replace(**changes)
    forward, backward = counted(cfg, batch=2)
    assert flops.forward_flops(cfg, 2) == forward
    # checkpointed layers run their forward again inside backward
    assert flops.train_flops(cfg, 2) - flops.forward_flops(cfg, 2) + flops.recompute_flops(cfg, 2) == backward


def test_published_model_scale():
    cfg = get_preset("cogvideo-stage1")
    per_sample = flops.train_flops(cfg)
    # ~6 N D for the 1.7B trainable and ~4 N D for the 6B frozen parameters at 2064 tokens,
    # plus attention: between 50 and 100 TFLOP per sequence
    assert 50e12 < per_sample < 100e12
    assert flops.forward_flops(cfg, 4) == 4 * flops.forward_flops(cfg)

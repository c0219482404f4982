"""Backbone -> video initialisation, freezing, parameter counts and activation checkpointing."""

import pytest
import torch
from model_helpers import random_batch

from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.model import init_video_from_backbone, is_backbone_param
from cogvideo.params import count_parameters


def _backbone_and_video(stage, **changes):
    video_cfg = get_preset("tiny" if stage == "stage1" else "tiny-stage2").replace(**changes)
    backbone_cfg = video_cfg.replace(stage="backbone", num_frames=1)
    torch.manual_seed(0)
    backbone = build_model(backbone_cfg).eval()
    video = build_model(video_cfg, init_weights=False).eval()
    video.load_state_dict(init_video_from_backbone(backbone.state_dict(), video_cfg))
    return backbone, video


def test_one_frame_stage1_model_equals_backbone():
    backbone, video = _backbone_and_video("stage1", num_layers=3)
    cfg = video.cfg
    tokens, _, _ = random_batch(cfg)
    one_frame = tokens[:, : cfg.text_length + cfg.tokens_per_frame]
    with torch.no_grad():
        video.layers[1].temporal_gate.normal_()  # any gate: both channels agree on one frame
        expected = backbone(one_frame)
        torch.testing.assert_close(video(one_frame), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(video(one_frame, temporal=False), expected, atol=1e-5, rtol=1e-5)


def test_one_frame_stage2_temporal_channel_reproduces_spatial():
    # Stage 2's frame 0 is a given (bidirectional) frame, so it is not CogView2's causal frame;
    # what the initialisation guarantees is that the copied channel adds nothing on one frame
    # (with a window covering the frame, the temporal channel sees what the spatial one sees).
    _, video = _backbone_and_video("stage2", num_layers=3, window_size=4, window_shift=0)
    cfg = video.cfg
    tokens, _, _ = random_batch(cfg)
    one_frame = tokens[:, : cfg.text_length + cfg.tokens_per_frame]
    with torch.no_grad():
        for layer in video.layers:
            layer.temporal_gate.normal_()
        torch.testing.assert_close(video(one_frame), video(one_frame, temporal=False), atol=1e-5, rtol=1e-5)


def test_frame_positions_tile_backbone_image_rows():
    backbone, video = _backbone_and_video("stage1")
    cfg = video.cfg
    rows = backbone.position_embeddings.weight[
        cfg.position_offset : cfg.position_offset + cfg.tokens_per_frame
    ]
    assert torch.equal(video.frame_position_embeddings.weight, rows.repeat(cfg.num_frames - 1, 1))


def test_backbone_frozen_by_default_and_switchable():
    frozen = build_model(get_preset("tiny"))
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(not is_backbone_param(n) for n in trainable)
    assert any(n.endswith("temporal_gate") for n in trainable)
    unfrozen = build_model(get_preset("tiny").replace(train_backbone=True))
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_init_refuses_non_backbone_state():
    _, video = _backbone_and_video("stage1")
    with pytest.raises(ValueError, match="video parameters"):
        init_video_from_backbone(video.state_dict(), video.cfg)
    with pytest.raises(ValueError, match="lacks"):
        init_video_from_backbone({"word_embeddings.weight": torch.zeros(1)}, video.cfg)


def test_published_parameter_counts():
    backbone = count_parameters(get_preset("cogview2-6b"))
    assert 5.8e9 < backbone.total < 6.0e9
    for stage in ("cogvideo-stage1", "cogvideo-stage2"):
        counts = count_parameters(get_preset(stage))
        assert 7.6e9 < counts.total < 7.8e9
        assert 1.7e9 < counts.trainable < 1.85e9
        assert counts.frozen == backbone.total


@pytest.mark.parametrize("preset", ["tiny", "tiny-stage2"])
def test_activation_checkpointing_gives_same_gradients(preset):
    cfg = get_preset(preset).replace(num_layers=3)
    tokens, targets, mask = random_batch(cfg)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.replace(activation_checkpointing=ckpt)).train()
        model.loss(model(tokens), targets, mask).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)

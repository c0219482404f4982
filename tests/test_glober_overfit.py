"""Overfitting one short video: the video auto-encoder trained on a single 3-frame clip (a block
moving right, a different channel darkened per frame) samples, from its global feature and the
three normalised indices, each of those frames in order; the same feature with the indices
reversed samples them reversed (the index, not the noise, picks the frame)."""

from __future__ import annotations

import itertools

import pytest
import torch

from cogvideo.family import build_model, resolve_model_section
from cogvideo.models.glober.losses import decode_pass
from cogvideo.models.glober.sampler import GloberSampler, GloberSampling, frame_indices

FRAMES = 3
STEPS = 400


def clip(cfg) -> torch.Tensor:
    c, size, _ = cfg.latent_shape
    video = torch.zeros(FRAMES, c, size, size)
    for f in range(FRAMES):
        video[f, :, 1:3, f : f + 2] = 2.0
        video[f, f % c] -= 1.0
    return video


@pytest.mark.slow
def test_overfitting_one_short_video_reproduces_its_frames_in_order(one_thread):
    torch.manual_seed(0)
    # v-prediction: its one-step x0 estimate stays well conditioned at high noise, where a briefly
    # trained epsilon model cannot yet place the block (the frames come out of order)
    cfg = resolve_model_section(
        {
            "family": "glober",
            "preset": "glober-tiny",
            "num_frames": FRAMES,
            "frame_size": 8,
            "decoder": {"guidance_dropout": 0.0, "attention_resolutions": [4]},
            "schedule": {"prediction_type": "v_prediction"},
        }
    )
    model = build_model(cfg, device="cpu")
    video = clip(cfg)
    pairs = torch.tensor(list(itertools.combinations(range(FRAMES), 2)) * 4)  # every (i < j), 4 times
    keyframes = video[list(cfg.keyframes)]
    params = [p for p in model.autoencoder.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / STEPS)
    for _ in range(STEPS):
        decoded = decode_pass(
            cfg, model.autoencoder, keyframes.expand(len(pairs), -1, -1, -1, -1), video[pairs], pairs / 2.0
        )
        optimizer.zero_grad()
        (decoded.rec + cfg.kl_weight * decoded.kl).backward()
        optimizer.step()
        schedule.step()

    sampler = GloberSampler(model, GloberSampling(frame_steps=20, frame_guidance=1.0))
    with torch.no_grad():
        global_feature = model.autoencoder.encoder(keyframes[None]).mode()
    noise = torch.randn(1, FRAMES, *cfg.latent_shape, generator=torch.Generator().manual_seed(1))
    for indices, order in ((frame_indices(FRAMES), [0, 1, 2]), (frame_indices(FRAMES).flip(0), [2, 1, 0])):
        frames = sampler.frames(global_feature, indices, noise)[0]
        error = (frames[:, None] - video[None]).pow(2).flatten(2).mean(2)  # [sampled, true]
        assert error.argmin(1).tolist() == order, error
        own = error[range(FRAMES), order]
        others = error.masked_fill(
            torch.nn.functional.one_hot(torch.tensor(order), FRAMES).bool(), float("inf")
        )
        assert (own < 0.35 * video.pow(2).flatten(1).mean(1)[order]).all(), error
        assert (own < others.amin(1) / 3).all(), error

"""benchmarks/probe_glober_order.py: GLOBER's order probes (README, GLOBER) on glober-tiny and a
few latent clips: the shards read in order, a reversal's distance against hand-computed ones, the
swapped indices' loss of decoders that do and do not read the index, and the in-process training
keeping the encoder frozen for model.encoder_frozen_steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from test_glober_model import perturbed, tiny
from test_glober_train import write_latent_shards

from benchmarks.probe_glober_order import (
    TIMESTEPS,
    probe,
    probe_clips,
    read_moments,
    reversal,
    swapped,
    train,
)
from cogvideo.diffusion.objective import objective_for
from cogvideo.family import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moments(tmp_path_factory) -> torch.Tensor:
    root = tmp_path_factory.mktemp("latents")
    write_latent_shards(root)
    return read_moments([str(root / "latents-*.tar")])


class OrderBlind(torch.nn.Module):
    """An encoder that sees every keyframe as their sum: blind to their order."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, keyframes):
        return self.encoder(keyframes.sum(1, keepdim=True).expand_as(keyframes))


class Identity(torch.nn.Module):
    """An encoder whose feature is the keyframes themselves (posterior std 1)."""

    def forward(self, keyframes):
        flat = keyframes.flatten(1, 2)
        return DiagonalGaussianDistribution(torch.cat([flat, torch.zeros_like(flat)], dim=1))


class IndexBlind(torch.nn.Module):
    """A decoder that reads every frame as index 0."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, x, t, feature, index):
        return self.decoder(x, t, feature, torch.zeros_like(index))


class IndexOutput(torch.nn.Module):
    """A decoder whose output is its index plus the mean of its global feature."""

    def forward(self, x, t, feature, index):
        return (index + feature.flatten(1).mean(1))[:, None, None, None].expand_as(x)


def test_read_moments_reads_every_clip_in_the_order_of_the_sorted_paths(moments):
    rng = np.random.default_rng(0)  # write_latent_shards' draws, shard by shard
    means = torch.from_numpy(np.stack([rng.standard_normal((5, 4, 8, 8)) for _ in range(24)])).float()
    assert moments.shape == (24, 5, 8, 8, 8)
    assert torch.equal(moments[:, :, :4], means)


def test_reversal_is_zero_without_order_and_the_distances_of_the_features_with_it(moments):
    cfg = tiny()
    clips = probe_clips(cfg, moments[-6:])
    encoder = perturbed(build_model(cfg, device="cpu")).autoencoder.encoder.eval()
    blind_reversal, blind_other = reversal(OrderBlind(encoder), clips.keyframes)
    assert blind_reversal == 0.0 and blind_other > 0
    kf = clips.keyframes.double()  # the identity feature: distances of the keyframes themselves
    expected_reversal = np.mean([(kf[i] - kf[i].flip(0)).norm().item() for i in range(6)])
    expected_other = np.mean([(kf[i] - kf[i - 1]).norm().item() for i in range(6)])
    got_reversal, got_other = reversal(Identity(), clips.keyframes)
    assert got_reversal == pytest.approx(expected_reversal, rel=1e-5)
    assert got_other == pytest.approx(expected_other, rel=1e-5)


def test_swapped_indices_cost_nothing_to_a_decoder_blind_to_them_and_more_to_one_reading_them(moments):
    cfg = tiny()
    clips = probe_clips(cfg, moments[-6:])
    assert clips.frames.shape == (6, 4, 8, 8) and clips.indices.tolist() == [0.0, 1.0] * 3
    # frames 0 and F - 1 of the first 3 probe clips, at their posterior means
    assert torch.equal(clips.frames[1], moments[-6, -1, :4] * cfg.vae.scaling_factor)
    autoencoder = perturbed(build_model(cfg, device="cpu")).autoencoder.eval()
    features = autoencoder.encoder(clips.keyframes).mean.detach()
    assert swapped(cfg, IndexBlind(autoencoder.decoder), features, clips) == (1.0, 1.0, 1.0)
    ratios = swapped(cfg, autoencoder.decoder, features, clips)
    assert all(r != 1.0 for r in ratios), ratios  # one pass's outputs, bit for bit, else
    # a decoder that outputs its index + its feature's mean, on features 0, 1, ..., 5: the losses of
    # outputs 1 - i + m and i + m against the targets, m the clip's feature (pairs of frames: 0, 0, 1, 1, 2, 2)
    objective = objective_for(cfg.schedule)
    m = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0], dtype=torch.float64)[:, None, None, None]
    expected = []
    for step in TIMESTEPS:
        t = torch.full((6,), step)
        target = objective.target(clips.frames, clips.noise, t).double()
        i = clips.indices.double()[:, None, None, None]
        expected.append(((1 - i + m - target) ** 2).mean().item() / ((i + m - target) ** 2).mean().item())
    assert swapped(cfg, IndexOutput(), torch.arange(6.0)[:, None], clips) == pytest.approx(expected, rel=1e-5)
    autoencoder.train()
    probes = probe(cfg, autoencoder, clips)
    assert autoencoder.training and probes.swapped == ratios
    assert (probes.reversal, probes.other) == reversal(autoencoder.encoder.eval(), clips.keyframes)


def test_training_keeps_the_encoder_frozen_for_its_steps_and_then_trains_it(moments):
    overrides = ["model.preset=glober-tiny", "model.encoder_frozen_steps=2", "training.micro_batch_size=2"]
    results = train(overrides + ["training.seed=0"], moments, clips=6, steps=3, every=1)
    assert [step for step, _ in results] == [0, 1, 2, 3]
    distances = [(p.reversal, p.other) for _, p in results]
    assert distances[0] == distances[1] == distances[2] != distances[3]  # frozen for steps 1 and 2
    assert results[1][1].swapped != results[0][1].swapped  # the decoder trains from the first step

"""GLOBER's batch builder: one latent-shard sample -> the tensors its losses read.

GLOBER reads shards of kind `latents` (cogvideo.shards): its `latents` array holds the KL-VAE
encoder's moments of every frame of a clip, [F, 2 C', L, L] (mean, then log-variance, along the
channels; written once by data preparation), beside the caption. Per sample and seed (fixed per
run seed, epoch and sample, so an exact resume draws the same):

    keyframes  [K, C', L, L]   scaled latents of the K keyframes (equal intervals, first and last)
    frames     [2, C', L, L]   scaled latents of two frames i < j drawn uniformly (the CRA pair)
    indices    [2]             i / (F - 1), j / (F - 1)
    text       [text_length]   caption ids, left-padded with the pad id

Latents are drawn from each frame's posterior (LDM's first-stage encoding) with the sample's seed.
"""

from __future__ import annotations

import torch

from cogvideo.models.glober.config import GloberConfig
from cogvideo.models.glober.vae import sample_latents
from cogvideo.shards import Sample


def padded_text(cfg: GloberConfig, text_ids) -> torch.Tensor:
    text = torch.full((cfg.text_length,), cfg.vocab.pad_id, dtype=torch.long)
    ids = torch.as_tensor(list(text_ids)[: cfg.text_length], dtype=torch.long)
    text[cfg.text_length - len(ids) :] = ids
    return text


def target_frames(num_frames: int, generator: torch.Generator) -> torch.Tensor:
    """Two distinct frame indices i < j, uniformly among all pairs."""
    return torch.randperm(num_frames, generator=generator)[:2].sort().values


def moments_shape(cfg: GloberConfig) -> tuple[int, int, int, int]:
    return (cfg.num_frames, 2 * cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size)


def sample_problem(cfg: GloberConfig, sample: Sample) -> str | None:
    """The latents' shape is the model's: its frames, KL-VAE moments and latent size."""
    latents = sample.arrays["latents"]
    if tuple(latents.shape) != moments_shape(cfg):
        return (
            f"latents {list(latents.shape)} do not fit the model's {list(moments_shape(cfg))} "
            "(num_frames, 2 x vae.latent_channels, frame_size / vae factor, same): prepare them with this "
            "model's KL-VAE and num_frames"
        )
    return None


def glober_example(cfg: GloberConfig, sample: Sample, text_ids, seed: int) -> dict[str, torch.Tensor]:
    return example_from_moments(cfg, torch.from_numpy(sample.arrays["latents"]), text_ids, seed)


def example_from_moments(
    cfg: GloberConfig, moments: torch.Tensor, text_ids, seed: int
) -> dict[str, torch.Tensor]:
    moments = moments.float()
    g = torch.Generator().manual_seed(seed % 2**63)
    pair = target_frames(cfg.num_frames, g)
    rows = torch.cat([torch.tensor(cfg.keyframes), pair])
    latents = sample_latents(moments[rows], cfg.vae.scaling_factor, g)
    k = len(cfg.keyframes)
    return {
        "keyframes": latents[:k],
        "frames": latents[k:],
        "indices": pair.float() / (cfg.num_frames - 1),
        "text": padded_text(cfg, text_ids),
    }

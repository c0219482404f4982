"""The frozen frame autoencoder: diffusers' AutoencoderKL (weights from a local folder,
`cogvideo.models.glober.pretrained`), and the conversions between frames and latents.

Pixels are in [-1, 1]. Frames become the encoder's moments (mean and log-variance: what latent
shards store); training draws latents from them scaled by `scaling_factor` (Stable Diffusion's
0.18215, so that they have about unit variance); decoding divides the scale back out.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from cogvideo.models.glober.config import VAEConfig
from cogvideo.models.glober.pretrained import folder_problem

SHAPE_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "in_channels")


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    """The KL-VAE of `cfg`'s shape, frozen (its weights come from `cfg.path` or a fit)."""
    vae = AutoencoderKL(**cfg.diffusers_config())
    vae.requires_grad_(False)
    return vae


def vae_folder_problem(cfg: VAEConfig) -> str | None:
    return folder_problem(cfg.path, cfg.diffusers_config(), SHAPE_KEYS, "model.vae.path")


def encode_moments(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Frames [N, 3, H, W] in [-1, 1] -> the posterior's parameters [N, 2 * C', H/f, W/f] (mean; logvar)."""
    return vae.encode(pixels).latent_dist.parameters


def sample_latents(
    moments: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scaled latents drawn from the posterior (LDM's `get_first_stage_encoding`)."""
    return DiagonalGaussianDistribution(moments).sample(generator) * scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [N, C', h, w] -> frames [N, 3, H, W] (about [-1, 1])."""
    return vae.decode(latents / vae.config.scaling_factor).sample

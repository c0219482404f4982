"""HPDM's training example and loss: one pyramid of nested patches per video, every level noised
at its own EDM noise level and denoised jointly in one forward pass.

The example draws everything random from the sample's seed (patch places, noise levels, noise,
condition dropout), so TP peers see the same example and an exact resume draws it again. The
loss is EDM's: lambda(sigma) * mean squared error of D against the clean patch, averaged over
the levels (equal weight) and the batch.
"""

from __future__ import annotations

import torch

from cogvideo.diffusion import edm
from cogvideo.diffusion.guidance import drop_condition
from cogvideo.models.hpdm import pyramid
from cogvideo.models.hpdm.config import HPDMConfig


def null_condition(cfg: HPDMConfig) -> torch.Tensor:
    """Guidance's unconditional input: the null class, or a caption of padding alone."""
    if cfg.condition == "class":
        return torch.tensor(cfg.num_classes)
    return torch.full((cfg.text_length,), cfg.vocab.pad_piece_id, dtype=torch.long)


def training_example(cfg: HPDMConfig, video: torch.Tensor, condition: torch.Tensor, seed: int) -> dict:
    """video uint8 [T, H, W, 3] at the finest level's size; condition a class id (scalar) or caption
    ids [text_length] -> the example's tensors (see `pyramid_loss`)."""
    g = torch.Generator().manual_seed(seed % 2**63)
    if tuple(video.shape) != (*cfg.video_size, 3):
        raise ValueError(
            f"hpdm: a video of {tuple(video.shape)} pixels, the pyramid needs {(*cfg.video_size, 3)}"
        )
    pixels = video.permute(3, 0, 1, 2).to(torch.float32) / 127.5 - 1
    offsets = pyramid.sample_offsets(cfg, g)
    patches = pyramid.extract_patches(cfg, pixels, offsets)
    sigma = torch.cat([edm.sample_sigmas(cfg.level_edm(lv), (1,), g) for lv in range(1, cfg.num_levels + 1)])
    sigma = sigma.to(torch.float32)
    noise = torch.randn(patches.shape, generator=g)
    condition = drop_condition(torch.as_tensor(condition)[None], null_condition(cfg), cfg.cond_dropout, g)[0]
    return {
        "patches": patches,
        "offsets": offsets,
        "sigma": sigma,
        "noise": noise,
        "condition": condition.to(torch.long),
    }


def pyramid_loss(cfg: HPDMConfig, model, tensors: dict, device: torch.device) -> torch.Tensor:
    """EDM's weighted x-prediction loss over every level of a batch of examples (tensors batched:
    patches / noise [B, levels, 3, *patch], offsets [B, levels, 3], sigma [B, levels])."""
    clean = tensors["patches"].to(device)
    sigma = tensors["sigma"].to(device, torch.float32)
    noisy = clean + tensors["noise"].to(device) * sigma[..., None, None, None, None]
    pre = edm.Preconditioner(cfg.edm)
    s = sigma[..., None, None, None, None]
    starts, extents = zip(
        *[
            pyramid.boxes(cfg, lv, tensors["offsets"][:, lv - 1], cfg.level_size(lv))
            for lv in range(1, cfg.num_levels + 1)
        ]
    )
    start, extent = torch.stack(starts, 1), torch.stack(extents, 1)
    network_in, c_noise = pre.c_in(noisy, s), pre.c_noise(sigma)
    dtype = next(model.parameters()).dtype
    out = model(network_in.to(dtype), c_noise.to(dtype), start, extent, tensors["condition"].to(device))
    denoised = pre.denoised(noisy, out.float(), s)
    per_level = (denoised - clean).pow(2).flatten(2).mean(-1)  # [B, levels]
    return (edm.loss_weight(cfg.edm, sigma) * per_level).mean()

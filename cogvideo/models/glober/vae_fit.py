"""Fitting a small KL-VAE (diffusers' AutoencoderKL of a GLOBER preset's `vae` section) on
frames, for when no pretrained one fits (the demo's 32 px synthetic world; Stable Diffusion's VAE
is the real use), and its command.

LDM's first-stage objective without its perceptual and adversarial terms: L1 reconstruction plus
a small KL to N(0, I); Adam with a linearly decaying rate. The fitted latent space is then
rescaled so that the preset's `scaling_factor` gives latents of unit standard deviation (LDM's
`scale_by_std`, folded into the VAE's 1x1 quant convolutions: the reconstructions do not change),
so the folder works with the model config as it is. The result is a diffusers folder
(`save_pretrained`) for `model.vae.path`.

Command: ``cogvideo-fit-vae preset=glober-demo frames=DIR_OR_GLOB out=FOLDER``
(or ``python -m cogvideo.models.glober.vae_fit``)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from cogvideo.configio import ConfigError, config_parser, parse_config
from cogvideo.family import get_family
from cogvideo.metrics import psnr
from cogvideo.models.glober.config import GloberConfig, VAEConfig
from cogvideo.tokenizers.patch_fit import held_out_split, read_frames

SUMMARY = "summary.json"  # written beside the weights: frames, seconds, train / held-out PSNR
# frames the latent scale and the train PSNR are measured on (a seeded subset of more): encoding
# and decoding all 15,000 of the demo's frames took longer than a third of its fit
MEASURED_FRAMES = 4096


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_frames(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def fit_vae(
    frames: np.ndarray,
    cfg: VAEConfig,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log_every: int = 0,
) -> AutoencoderKL:
    """An AutoencoderKL of `cfg`'s shape fitted to `frames` (uint8 [N, H, W, 3]), its latents
    rescaled to unit standard deviation under `cfg.scaling_factor`; frozen, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**cfg.diffusers_config())
    pixels = to_pixels(frames)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    vae.train()
    for step in range(steps):
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = (recon - batch).abs().mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"vae fit: step {step + 1}/{steps}, loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    fold_latent_scale(
        vae, 1 / (cfg.scaling_factor * latent_std(vae, subset(frames, MEASURED_FRAMES, seed), seed))
    )
    return vae


def subset(frames: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` of `frames` drawn without replacement (seeded), or all of them when no more."""
    if len(frames) <= count:
        return frames
    return frames[np.sort(np.random.default_rng(seed).choice(len(frames), count, replace=False))]


@torch.no_grad()
def latent_std(vae: AutoencoderKL, frames: np.ndarray, seed: int = 0, batch_size: int = 256) -> float:
    """The standard deviation of latents drawn from the posteriors of `frames` (what training draws)."""
    generator = torch.Generator().manual_seed(seed)
    draws = [
        vae.encode(to_pixels(chunk)).latent_dist.sample(generator)
        for chunk in np.array_split(frames, max(1, -(-len(frames) // batch_size)))
    ]
    return torch.cat(draws).double().std().item()


@torch.no_grad()
def fold_latent_scale(vae: AutoencoderKL, scale: float) -> None:
    """Reparameterise `vae` so that its latents are `scale` times what they were, decoding the
    same: the posterior mean x scale, log-variance + 2 ln(scale) (quant_conv's outputs), and
    post_quant_conv reading latents / scale."""
    channels = vae.config.latent_channels
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.weight[:channels] *= scale
    quant.bias[:channels] *= scale
    quant.bias[channels:] += 2 * math.log(scale)
    post.weight /= scale


@torch.no_grad()
def round_trip(vae: AutoencoderKL, frames: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Frames through the VAE (posterior mean, decoded): what the autoencoder alone costs them."""
    out = []
    for chunk in np.array_split(frames, max(1, -(-len(frames) // batch_size))):
        out.append(to_frames(vae.decode(vae.encode(to_pixels(chunk)).latent_dist.mode()).sample))
    return np.concatenate(out)


@dataclass
class FitVAEConfig:
    preset: str = "glober-demo"  # a GLOBER preset: its frame_size and its vae section (shape, scaling_factor)
    frames: str = ""  # directory or glob of png/jpg frames or video files
    out: str = ""  # output folder in diffusers' layout (config.json + safetensors), for model.vae.path
    held_out: float = 0.1  # fraction of frames kept out of the fit for the PSNR (whole files when several)
    max_frames: int = 20000
    steps: int = 1500  # Adam steps
    batch_size: int = 32
    lr: float = 1.0e-3  # decays linearly to 0
    kl_weight: float = 1.0e-6  # LDM's first stage: a small KL to N(0, I) beside the L1 reconstruction
    seed: int = 0

    def model_config(self) -> GloberConfig:
        presets = get_family("glober").presets
        if self.preset not in presets:
            raise ConfigError(f"preset: {self.preset!r} is not a GLOBER preset; known: {sorted(presets)}")
        return presets[self.preset]()

    def __post_init__(self):
        self.model_config()
        if not self.frames or not self.out:
            raise ConfigError(f"frames and out: required, got frames={self.frames!r} out={self.out!r}")
        if not 0 <= self.held_out < 1:
            raise ConfigError(f"held_out: expected a fraction in [0, 1), got {self.held_out}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps and batch_size: at least 1, got {self.steps} and {self.batch_size}")


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(
        FitVAEConfig,
        "cogvideo-fit-vae",
        "Fit a GLOBER preset's KL-VAE on frames (L1 + KL), its latents scaled to the preset's "
        "scaling_factor, and report its reconstruction PSNR on held-out frames.",
    )
    cfg, _ = parse_config(FitVAEConfig, parser, argv)
    model = cfg.model_config()
    start = time.perf_counter()
    try:
        read = read_frames(cfg.frames, model.frame_size, cfg.max_frames, progress=True)
    except FileNotFoundError as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    is_held = held_out_split(read.sources, cfg.held_out, cfg.seed)
    held, train = read.frames[is_held], read.frames[~is_held]
    vae = fit_vae(
        train,
        model.vae,
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        cfg.kl_weight,
        cfg.seed,
        log_every=cfg.steps // 10,
    )
    vae.save_pretrained(cfg.out, safe_serialization=True)
    measured = subset(train, MEASURED_FRAMES, cfg.seed)
    summary = {
        "preset": cfg.preset,
        "train_frames": len(train),
        "held_out_frames": len(held),
        "seconds": round(time.perf_counter() - start, 1),
        "train_psnr_db": round(psnr(measured, round_trip(vae, measured)), 2),  # on MEASURED_FRAMES at most
        "held_out_psnr_db": round(psnr(held, round_trip(vae, held)), 2) if len(held) else None,
    }
    (Path(cfg.out) / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"fitted the {cfg.preset} KL-VAE ({model.frame_size}px frames, factor {model.vae.factor}, "
        f"{model.vae.latent_channels} latent channels) on {len(train)} frames in {summary['seconds']}s "
        f"-> {cfg.out}"
    )
    print(f"train PSNR {summary['train_psnr_db']:.2f} dB on {len(measured)} of the {len(train)} train frames")
    if len(held):
        print(f"held-out PSNR {summary['held_out_psnr_db']:.2f} dB on {len(held)} frames")
    else:
        print("held-out PSNR: not measured (held_out=0, or a single frame)")


if __name__ == "__main__":
    main()

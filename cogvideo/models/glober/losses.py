"""GLOBER's training losses, one per optimised part.

Phase autoencoder (paper Eq. 8 and 10), on a batch of keyframe latents [B, K, C', L, L], two
target frames' latents [B, 2, C', L, L] (frames i < j) and their normalised indices [B, 2]:

    autoencoder:    L = L_rec + kl_weight * L_kl + cra_weight * L_cra^G
    discriminator:  L_cra^D (the auto-encoder's frames without gradient)

Phase generator: the DiT's diffusion loss on the frozen encoder's global features (its
posterior's mean) of the caption's video.

Draws (posterior sample, condition dropout, timesteps, noise) use torch's default generator,
which the trainer seeds per rank and saves with every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cogvideo.diffusion.guidance import drop_condition
from cogvideo.diffusion.objective import objective_for
from cogvideo.models.glober.config import GloberConfig
from cogvideo.models.glober.cra import adversarial_loss, cra_pairs
from cogvideo.models.glober.vae import decode_latents


@dataclass
class DecodedFrames:
    """The decoder's pass over the two target frames of every video."""

    rec: torch.Tensor  # the diffusion loss (mean over frames)
    kl: torch.Tensor  # KL of the global features to N(0, I), summed per video, mean over videos
    real: torch.Tensor | None  # [B, 2, 3, H, W] the target frames, decoded by the KL-VAE
    fake: torch.Tensor | None  # [B, 2, 3, H, W] the one-step x0 estimates, decoded by the KL-VAE


def decode_pass(
    cfg: GloberConfig,
    autoencoder,
    keyframes,
    frames,
    indices,
    pixels: bool = True,
    encoder_frozen: bool = False,
) -> DecodedFrames:
    """The diffusion loss and KL of the two target frames; with `pixels`, both frames and their
    one-step estimates decoded to pixels for the CRA loss. `encoder_frozen`: the losses reach the
    encoder with zero gradients (its parameters still get gradients, all zero, so an optimizer
    over the whole auto-encoder leaves them as they are: Adam's moments stay zero; a decoupled
    weight decay, off in the demo's phase file, would still shrink them)."""
    objective = objective_for(cfg.schedule)
    posterior = autoencoder.encoder(keyframes)
    global_feature = posterior.sample()
    kl = posterior.kl().mean()
    if encoder_frozen:
        global_feature = global_feature.detach() + 0 * global_feature
        kl = kl.detach() + 0 * kl
    global_feature = drop_condition(
        global_feature, torch.zeros_like(global_feature[0]), cfg.decoder.guidance_dropout
    )
    b = frames.shape[0]
    z0 = frames.flatten(0, 1)
    t, noise = objective.draw(z0)
    noisy = objective.noisy(z0, noise, t)
    output = autoencoder.decoder(noisy, t, global_feature.repeat_interleave(2, dim=0), indices.flatten())
    rec = objective.loss(output, objective.target(z0, noise, t)).mean()
    if not pixels:
        return DecodedFrames(rec, kl, None, None)
    estimate = objective.predicted_x0(noisy, output, t)
    vae = autoencoder.vae
    fake = decode_latents(vae, estimate.to(vae.dtype)).unflatten(0, (b, 2))
    with torch.no_grad():
        real = decode_latents(vae, z0.to(vae.dtype)).unflatten(0, (b, 2))
    return DecodedFrames(rec, kl, real, fake)


def _cra(cfg: GloberConfig, discriminator, decoded: DecodedFrames, indices, for_discriminator: bool):
    pairs, labels = cra_pairs(decoded.real, decoded.fake, for_discriminator)
    kinds = pairs.shape[0] // indices.shape[0]
    logits = discriminator(pairs, indices.repeat(kinds, 1))
    return adversarial_loss(logits, labels, kinds, cfg.adversarial_loss)


def autoencoder_loss(
    cfg: GloberConfig, autoencoder, discriminator, batch: dict, encoder_frozen: bool = False
) -> dict[str, torch.Tensor]:
    """`encoder_frozen`: during the first `encoder_frozen_steps` (decode_pass)."""
    with_cra = cfg.cra_weight > 0  # else neither the pixels nor the discriminator: L_rec + L_kl alone
    keyframes, frames, indices = batch["keyframes"], batch["frames"], batch["indices"]
    decoded = decode_pass(cfg, autoencoder, keyframes, frames, indices, with_cra, encoder_frozen)
    if not with_cra:
        loss = decoded.rec + cfg.kl_weight * decoded.kl
        return {"loss": loss, "rec": decoded.rec.detach(), "kl": decoded.kl.detach()}
    cra = _cra(cfg, discriminator, decoded, batch["indices"], for_discriminator=False)
    loss = decoded.rec + cfg.kl_weight * decoded.kl + cfg.cra_weight * cra
    return {"loss": loss, "rec": decoded.rec.detach(), "kl": decoded.kl.detach(), "cra_g": cra.detach()}


def discriminator_loss(cfg: GloberConfig, autoencoder, discriminator, batch: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        decoded = decode_pass(cfg, autoencoder, batch["keyframes"], batch["frames"], batch["indices"])
    cra = _cra(cfg, discriminator, decoded, batch["indices"], for_discriminator=True)
    return {"loss": cra, "cra_d": cra.detach()}


def generator_loss(cfg: GloberConfig, autoencoder, dit, batch: dict) -> dict[str, torch.Tensor]:
    objective = objective_for(cfg.schedule)
    with torch.no_grad():
        global_feature = autoencoder.encoder(batch["keyframes"]).mode()
    t, noise = objective.draw(global_feature)
    noisy = objective.noisy(global_feature, noise, t)
    output = dit(noisy, t, batch["text"])
    loss = objective.loss(output, objective.target(global_feature, noise, t)).mean()
    return {"loss": loss}

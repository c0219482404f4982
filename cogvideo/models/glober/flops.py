"""GLOBER's training FLOPs, counted by torch's FlopCounterMode on the meta device: the phase's
real losses run forward and backward at batch 1 without memory, so the count is what the step
runs (convolutions, attention, the frozen KL-VAE's decode for the CRA loss), not a formula.

Phase autoencoder alternates its optimised parts; its FLOPs per sample are the average over the
alternation (generator_steps auto-encoder steps, then discriminator_steps discriminator steps).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from cogvideo.models.glober.config import GloberConfig
from cogvideo.models.glober.losses import autoencoder_loss, discriminator_loss, generator_loss


def config_key(cfg: GloberConfig) -> tuple:
    """A hashable key of every field (the sections are frozen dataclasses)."""
    return tuple(getattr(cfg, f.name) for f in dataclasses.fields(cfg))


def meta_batch(cfg: GloberConfig, batch: int = 1) -> dict[str, torch.Tensor]:
    c, size = cfg.vae.latent_channels, cfg.latent_size
    with torch.device("meta"):
        return {
            "keyframes": torch.empty(batch, cfg.encoder.num_keyframes, c, size, size),
            "frames": torch.empty(batch, 2, c, size, size),
            "indices": torch.empty(batch, 2),
            "text": torch.full((batch, cfg.text_length), cfg.vocab.pad_id, dtype=torch.long),
        }


def _counted(run) -> float:
    """FLOPs of run() and its backward; the losses' random draws leave torch's generator as it was
    (the trainer counts FLOPs after restoring a checkpoint's RNG states)."""
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        loss = run()
        if loss.requires_grad:
            loss.backward()
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=16)
def _phase_flops(build: Callable, key: tuple) -> float:
    cfg = GloberConfig(*key)
    with torch.device("meta"):  # the plain model, as cogvideo.family.plain_model builds it (that
        model = build(cfg)  # module imports the families, so a family cannot import it)
    batch = meta_batch(cfg)
    if cfg.phase == "generator":
        return _counted(lambda: generator_loss(cfg, model.autoencoder, model.dit, batch)["loss"])
    g = _counted(lambda: autoencoder_loss(cfg, model.autoencoder, model.discriminator, batch)["loss"])
    d = _counted(lambda: discriminator_loss(cfg, model.autoencoder, model.discriminator, batch)["loss"])
    steps = cfg.generator_steps + cfg.discriminator_steps
    return (g * cfg.generator_steps + d * cfg.discriminator_steps) / steps


def train_flops(build: Callable, cfg: GloberConfig) -> float:
    """Forward + backward FLOPs of one training sample (throughput, MFU, cogvideo-plan) of the
    model `build(cfg)` (the family's plain-model builder) makes."""
    return _phase_flops(build, config_key(cfg))


@functools.lru_cache(maxsize=16)
def _recomputed(build: Callable, key: tuple) -> float:
    cfg = GloberConfig(*key)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build(cfg)
        batch = meta_batch(cfg)
        t = torch.zeros(2, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            if cfg.phase == "generator":
                model.dit(torch.empty(1, *cfg.global_shape), t[:1], batch["text"])
            else:
                noisy = batch["frames"].flatten(0, 1)
                model.autoencoder.decoder(
                    noisy, t, torch.empty(2, *cfg.global_shape), batch["indices"].flatten()
                )
    return float(counter.get_total_flops())


def recompute_flops(build: Callable, cfg: GloberConfig) -> float:
    """Activation checkpointing's extra forward per sample: the DiT's blocks (phase generator) or
    the decoder over the two frames (phase autoencoder: its UNet's down and up blocks)."""
    if not cfg.activation_checkpointing:
        return 0.0
    return _recomputed(build, config_key(cfg))

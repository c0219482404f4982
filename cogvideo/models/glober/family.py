"""GLOBER as a model family: config and presets, plain model, initialisation, TP plan, losses,
batch builder, sampler, FLOPs and planner model (`cogvideo.family` reads them; nothing else
names the family).
"""

from __future__ import annotations

import functools

import torch

from cogvideo.family_spec import ModelFamily, OptimizedPart, PlannerModel, register
from cogvideo.models.glober import flops, planner
from cogvideo.models.glober.batch import glober_example, sample_problem
from cogvideo.models.glober.config import PRESETS, GloberConfig
from cogvideo.models.glober.losses import autoencoder_loss, discriminator_loss, generator_loss
from cogvideo.models.glober.model import TP_PLAN, GloberModel, from_autoencoder, init_weights


def tensors_on(model: torch.nn.Module, tensors: dict, device) -> dict:
    """The batch's tensors on `device`, floating ones in the model's precision."""
    dtype = next(p.dtype for p in model.parameters())
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in tensors.items()}


def train_loss(cfg: GloberConfig, engine, batch, device) -> torch.Tensor:
    """Phase generator's loss (the DiT); phase autoencoder trains as two optimised parts."""
    model = getattr(engine, "module", engine)
    tensors = tensors_on(model, batch.tensors, device)
    return generator_loss(cfg, model.autoencoder, model.dit, tensors)["loss"]


def _discriminator_part(cfg: GloberConfig, engines, batch, device) -> torch.Tensor:
    autoencoder, discriminator = engines["autoencoder"].module, engines["discriminator"].module
    return discriminator_loss(
        cfg, autoencoder, discriminator, tensors_on(autoencoder, batch.tensors, device)
    )["loss"]


def _autoencoder_part(cfg: GloberConfig, engines, batch, device) -> torch.Tensor:
    """The auto-encoder's loss; its engine's optimizer steps so far (`global_steps`, restored with
    its checkpoint) say whether the video encoder is still frozen (`encoder_frozen_steps`)."""
    engine, discriminator = engines["autoencoder"], engines["discriminator"].module
    frozen = engine.global_steps < cfg.encoder_frozen_steps
    tensors = tensors_on(engine.module, batch.tensors, device)
    return autoencoder_loss(cfg, engine.module, discriminator, tensors, encoder_frozen=frozen)["loss"]


def optimized_parts(cfg: GloberConfig) -> tuple[OptimizedPart, ...]:
    """Phase autoencoder alternates the video auto-encoder (generator_steps optimizer steps of
    L_rec + kl_weight L_kl + cra_weight L_cra^G; the encoder frozen for its first
    encoder_frozen_steps) and the CRA discriminator (discriminator_steps
    steps of L_cra^D); phase generator trains the DiT alone (the family's loss)."""
    if cfg.phase != "autoencoder":
        return ()
    return (
        OptimizedPart("autoencoder", "autoencoder", _autoencoder_part, lambda c: c.generator_steps),
        OptimizedPart("discriminator", "discriminator", _discriminator_part, lambda c: c.discriminator_steps),
    )


_activation_bytes, _layer_activation_bytes = planner.make_planner(GloberModel)

FAMILY = register(
    ModelFamily(
        name="glober",
        config=GloberConfig,
        presets=PRESETS,
        build_model=GloberModel,
        init_weights=init_weights,
        tp_plan=TP_PLAN,
        loss=train_loss,
        example=glober_example,
        shard_kind="latents",
        prep_encoder="latents",
        sample_problem=sample_problem,
        from_backbone=from_autoencoder,
        parts=optimized_parts,
        train_flops=functools.partial(flops.train_flops, GloberModel),
        sampler="cogvideo.models.glober.pipeline:GloberPipeline",
        planner=PlannerModel(
            describe=planner.describe,
            activation_bytes=_activation_bytes,
            layer_activation_bytes=_layer_activation_bytes,
            logits_bytes=planner.logits_bytes,
            recompute_flops=functools.partial(flops.recompute_flops, GloberModel),
            tp_allreduces=planner.tp_allreduces,
        ),
    )
)

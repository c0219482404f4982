"""CogVideo (stages backbone / 1 / 2) as a model family: the first one registered."""

from __future__ import annotations

import torch

from cogvideo import activations
from cogvideo.config import PRESETS, ModelConfig
from cogvideo.family_spec import ModelFamily, PlannerModel, register
from cogvideo.flops import recompute_flops, train_flops
from cogvideo.model import TP_PLAN, CogVideoModel, image_token_loss, init_weights
from cogvideo.sequence import build_sequence


def _train_loss(cfg: ModelConfig, model, batch, device: torch.device) -> torch.Tensor:
    logits = model(batch.tokens.to(device))
    return image_token_loss(cfg, logits, batch.targets.to(device), batch.loss_mask.to(device))


FAMILY = register(
    ModelFamily(
        name="cogvideo",
        config=ModelConfig,
        presets=PRESETS,
        build_model=CogVideoModel,
        init_weights=init_weights,
        tp_plan=TP_PLAN,
        loss=_train_loss,
        example=lambda cfg, text_ids, frames, seed: build_sequence(cfg, text_ids, frames),
        train_flops=lambda cfg: train_flops(cfg, batch=1),
        sampler="cogvideo.sampling.pipeline:VideoPipeline.load",
        sat_layout="cogvideo.checkpoint.sat_layout:COGVIDEO_SAT",
        planner=PlannerModel(
            describe=activations.describe,
            activation_bytes=activations.activation_bytes,
            layer_activation_bytes=activations.layer_activation_bytes,
            logits_bytes=activations.logits_bytes,
            recompute_flops=recompute_flops,
            tp_allreduces=activations.tp_allreduces,
        ),
    )
)

"""CogVideo (stages backbone / 1 / 2, CogView2's model as the backbone) as the model family
"cogvideo", the default: config and presets (`config.py`), sequence layout, position ids and
attention masks (`sequence.py`), attention kernels (`attention.py`: dense-mask and frame-blocked
in `blocked.py`, the KV cache in `kv_cache.py`), the plain model, TP plan, initialisation and
loss (`model.py`), FLOPs (`flops.py`) and activation memory (`planner.py`); its sampler
(`pipeline.py`, run by cogvideo/sampling/job.py): the options (`options.py`), the stage model as
the sampler sees it (`stage_model.py`), one decoding pass (`decode.py`) and the hierarchy frame
0 -> stage-1 keyframes -> stage-2 interpolation (`hierarchy.py`), with a KV cache; the token
strategies are shared (cogvideo/sampling/strategies.py)."""

from __future__ import annotations

import torch

from cogvideo.family_spec import ModelFamily, PlannerModel, register
from cogvideo.models.cogvideo import planner
from cogvideo.models.cogvideo.config import PRESETS, ModelConfig
from cogvideo.models.cogvideo.flops import recompute_flops, train_flops
from cogvideo.models.cogvideo.model import (
    TP_PLAN,
    CogVideoModel,
    image_token_loss,
    init_video_from_backbone,
    init_weights,
)
from cogvideo.models.cogvideo.sequence import build_sequence
from cogvideo.shards import Sample


def _train_loss(cfg: ModelConfig, model, batch, device: torch.device) -> torch.Tensor:
    tokens, targets, mask = (batch.tensors[name].to(device) for name in ("tokens", "targets", "loss_mask"))
    return image_token_loss(cfg, model(tokens), targets, mask)


def _example(cfg: ModelConfig, sample: Sample, text_ids: list[int], seed: int) -> dict[str, torch.Tensor]:
    tokens, targets, mask = build_sequence(cfg, text_ids, torch.from_numpy(sample.arrays["frames"]))
    return {"tokens": tokens, "targets": targets, "loss_mask": mask}


def sample_problem(cfg: ModelConfig, sample: Sample) -> str | None:
    """Frames of the model's shape, codes inside its image vocabulary."""
    frames, shape = sample.arrays["frames"], (cfg.num_frames, cfg.frame_tokens, cfg.frame_tokens)
    if frames.shape != shape:
        return f"frames {list(frames.shape)} do not fit the model's {list(shape)}"
    if frames.min() < 0 or frames.max() >= cfg.vocab.num_image_tokens:
        return f"frame codes outside [0, {cfg.vocab.num_image_tokens})"
    return None


FAMILY = register(
    ModelFamily(
        name="cogvideo",
        config=ModelConfig,
        presets=PRESETS,
        build_model=CogVideoModel,
        init_weights=init_weights,
        tp_plan=TP_PLAN,
        loss=_train_loss,
        example=_example,
        sample_problem=sample_problem,
        default_stage=lambda cfg: {"stage1": 1, "stage2": 2}.get(cfg.stage),
        from_backbone=init_video_from_backbone,
        train_flops=lambda cfg: train_flops(cfg, batch=1),
        sampler="cogvideo.models.cogvideo.pipeline:VideoPipeline",
        sat_layout="cogvideo.models.cogvideo.sat:COGVIDEO_SAT",
        planner=PlannerModel(
            describe=planner.describe,
            activation_bytes=planner.activation_bytes,
            layer_activation_bytes=planner.layer_activation_bytes,
            logits_bytes=planner.logits_bytes,
            recompute_flops=recompute_flops,
            tp_allreduces=planner.tp_allreduces,
        ),
    )
)

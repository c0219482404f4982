"""CogView2's direct super-resolution (the released CogVideo pipeline's last stage, 160 -> 480 px)
as the model family "dsr": config and presets (`config.py`), sequence layout and batch builder
(`layout.py`), local attention (`local_attention.py`), the plain model, TP plan, initialisation
and loss (`model.py`), FLOPs (`planner.py`), SAT layout (`sat.py`), sampler (`sampler.py`).

It trains on token shards carrying each frame's codes at both grids (`frames` and `sr_frames`,
written by `cogvideo-prep` for this family), the text being the caption alone (set
`data.prefix_template: "{caption}"`, as the release feeds the raw prompt)."""

from __future__ import annotations

import torch

from cogvideo.family_spec import ModelFamily, register
from cogvideo.models.dsr.config import PRESETS, DsrConfig
from cogvideo.models.dsr.layout import build_example
from cogvideo.models.dsr.model import TP_PLAN, DsrModel, high_res_loss, init_from_backbone, init_weights
from cogvideo.models.dsr.planner import PLANNER, train_flops
from cogvideo.shards import Sample


def _train_loss(cfg: DsrConfig, model, batch, device: torch.device) -> torch.Tensor:
    logits = model(batch.tensors["tokens"].to(device))
    return high_res_loss(cfg, logits, batch.tensors["targets"].to(device))


def _example(cfg: DsrConfig, sample: Sample, text_ids: list[int], seed: int) -> dict[str, torch.Tensor]:
    """One frame pair of the sample (which one: fixed by the sample's seed, so a resume draws it again)."""
    frames, high = sample.arrays["frames"], sample.arrays["sr_frames"]
    index = seed % len(frames)
    tokens, targets = build_example(cfg, text_ids, frames[index], high[index])
    return {"tokens": tokens, "targets": targets}


def sample_problem(cfg: DsrConfig, sample: Sample) -> str | None:
    """Both grids present, of the model's shapes, with codes inside its image vocabulary."""
    if "sr_frames" not in sample.arrays:
        return "no sr_frames (high-res codes): prepare the videos with cogvideo-prep model.family=dsr"
    frames, high = sample.arrays["frames"], sample.arrays["sr_frames"]
    low_side, high_side = cfg.frame_tokens, cfg.high_frame_tokens
    if frames.shape[1:] != (low_side, low_side) or high.shape != (len(frames), high_side, high_side):
        return (
            f"frames {list(frames.shape)} and sr_frames {list(high.shape)} do not fit the model's "
            f"[F, {low_side}, {low_side}] and [F, {high_side}, {high_side}]"
        )
    for codes in (frames, high):
        if codes.size and (codes.min() < 0 or codes.max() >= cfg.vocab.num_image_tokens):
            return f"codes outside [0, {cfg.vocab.num_image_tokens})"
    return None


FAMILY = register(
    ModelFamily(
        name="dsr",
        config=DsrConfig,
        presets=PRESETS,
        build_model=DsrModel,
        init_weights=init_weights,
        tp_plan=TP_PLAN,
        loss=_train_loss,
        example=_example,
        train_flops=train_flops,
        shard_kind="tokens",
        prep_encoder="sr_tokens",
        sample_problem=sample_problem,
        default_stage=lambda cfg: 1,
        from_backbone=init_from_backbone,
        sampler=None,  # a stage of CogVideo's pipeline (cogvideo-sample sr_checkpoint=...), not a pipeline
        planner=PLANNER,
        sat_layout="cogvideo.models.dsr.sat:DSR_SAT",
    )
)

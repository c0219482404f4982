"""CogView2's direct super-resolution (the released CogVideo pipeline's last stage, 160 -> 480 px)
as the model family "dsr": config and presets (`config.py`), sequence layout and batch builder
(`layout.py`), local attention (`local_attention.py`), the plain model, TP plan, initialisation
and loss (`model.py`)."""

from __future__ import annotations

import torch

from cogvideo.family_spec import ModelFamily, register
from cogvideo.models.dsr.config import PRESETS, DsrConfig
from cogvideo.models.dsr.model import TP_PLAN, DsrModel, high_res_loss, init_weights


def _train_loss(cfg: DsrConfig, model, batch, device: torch.device) -> torch.Tensor:
    logits = model(batch.tokens.to(device))
    return high_res_loss(cfg, logits, batch.targets[:, cfg.high_start :].to(device))


def _example(cfg: DsrConfig, text_ids, frames, seed: int):
    raise ValueError(
        "model.family=dsr trains on shards carrying paired low-res and high-res codes "
        "(cogvideo-prep with the high-res encoder); this data seam is not wired yet"
    )


def _train_flops(cfg: DsrConfig) -> float:
    from cogvideo.models.dsr.planner import train_flops

    return train_flops(cfg)


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
        train_flops=_train_flops,
        sat_layout="cogvideo.models.dsr.sat:DSR_SAT",
    )
)

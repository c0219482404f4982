"""HPDM, hierarchical patch diffusion in pixel space (Skorokhodov et al., CVPR 2024), as the model
family "hpdm": config and presets (`config.py`), the pyramid's geometry (`pyramid.py`), the plain
model, TP plan and initialisation (`model.py`), the training example and EDM loss (`loss.py`),
the level-by-level tiled sampler (`sampler.py`) and the planner model (`planner.py`). It reads
raw-frame shards (kind `frames`, uint8 pixels at the finest level's size)."""

from __future__ import annotations

import torch

from cogvideo.family_spec import ModelFamily, PlannerModel, register
from cogvideo.models.hpdm import planner
from cogvideo.models.hpdm.config import PRESETS, HPDMConfig
from cogvideo.models.hpdm.loss import pyramid_loss, training_example
from cogvideo.models.hpdm.model import TP_PLAN, HPDMModel, init_weights


def class_label(cfg: HPDMConfig, caption: str) -> int | None:
    """A class preset's label for a clip's caption (its class name, or the label itself)."""
    name = caption.strip()
    if cfg.classes:
        return cfg.classes.index(name) if name in cfg.classes else None
    return int(name) if name.isdigit() and int(name) < cfg.num_classes else None


def caption_pieces(cfg: HPDMConfig, text_ids) -> torch.Tensor:
    """The text tokenizer's model ids -> caption pieces, right-padded to text_length."""
    pieces = torch.full((cfg.text_length,), cfg.vocab.pad_piece_id, dtype=torch.long)
    ids = torch.as_tensor(list(text_ids)[: cfg.text_length], dtype=torch.long) - cfg.vocab.text_offset
    pieces[: len(ids)] = ids
    return pieces


def _example(cfg: HPDMConfig, sample, text_ids, seed: int) -> dict:
    if cfg.condition == "class":
        condition = torch.tensor(class_label(cfg, sample.caption))
    else:
        condition = caption_pieces(cfg, text_ids)
    return training_example(cfg, torch.from_numpy(sample.arrays["pixels"]), condition, seed)


def _reads_text(cfg: HPDMConfig) -> bool:
    return cfg.condition == "text"


def _sample_problem(cfg: HPDMConfig, sample) -> str | None:
    shape = tuple(sample.arrays["pixels"].shape)
    if shape != (*cfg.video_size, 3):
        return f"pixels {list(shape)}, the pyramid of {cfg.name} needs {[*cfg.video_size, 3]} (frames, H, W, RGB)"
    if cfg.condition == "class" and class_label(cfg, sample.caption) is None:
        known = "model.classes" if cfg.classes else f"a label 0..{cfg.num_classes - 1}"
        return f"caption {sample.caption!r} is not a class of {cfg.name} ({known})"
    return None


def _loss(cfg: HPDMConfig, model, batch, device: torch.device) -> torch.Tensor:
    return pyramid_loss(cfg, model, batch.tensors, device)


FAMILY = register(
    ModelFamily(
        name="hpdm",
        config=HPDMConfig,
        presets=PRESETS,
        build_model=HPDMModel,
        init_weights=init_weights,
        tp_plan=TP_PLAN,
        loss=_loss,
        example=_example,
        train_flops=planner.train_flops,
        shard_kind="frames",
        prep_encoder="frames",
        reads_text=_reads_text,
        sample_problem=_sample_problem,
        sampler="cogvideo.models.hpdm.sampling:HPDMPipeline",
        # the supplement: mixed precision (autocast or manual, fp16 or bf16) converged worse
        auto_excludes=("bf16", "fp16"),
        planner=PlannerModel(
            describe=planner.describe,
            activation_bytes=planner.activation_bytes,
            layer_activation_bytes=planner.layer_activation_bytes,
            logits_bytes=planner.logits_bytes,
            recompute_flops=planner.recompute_flops,
            tp_allreduces=planner.tp_allreduces,
        ),
    )
)

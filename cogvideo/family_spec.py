"""A model family's spec and the registry (see cogvideo/family.py for the lookups)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cogvideo.tp_plan import TPPlan


@dataclass(frozen=True)
class PlannerModel:
    """What `cogvideo-plan` needs of a family beyond its model and TP plan (which give the
    parameters on each TP rank): the activations one GPU keeps and the work around the matrix
    products. Sizes are bytes for `batch` sequences on one of `tp` ranks, `dtype` a precision
    name (cogvideo.precision); FLOPs are per sequence."""

    describe: Callable[[Any], str]  # one line: the model's shape, for the report
    # (cfg, batch, tp, dtype, act_ckpt): activations at the start of backward, where they peak
    activation_bytes: Callable[[Any, int, int, str, bool], float]
    layer_activation_bytes: Callable[[Any, int, int, str], float]  # what one layer keeps for backward
    logits_bytes: Callable[[Any, int, int, str], float]  # the output layer's share, freed first
    recompute_flops: Callable[[Any], float]  # activation checkpointing's extra forward (0 without)
    # (cfg, act_ckpt) -> (tensor-parallel all-reduces per step, elements of each per sequence)
    tp_allreduces: Callable[[Any, bool], tuple[int, int]]


@dataclass(frozen=True)
class ModelFamily:
    name: str
    # the model config dataclass: name, validate(tensor_parallel), activation_checkpointing, num_layers
    # (the TP plan's blocks), and the video shape fields the shard loader reads (text_length,
    # num_frames, frame_tokens, vocab, stage)
    config: type
    presets: Mapping[str, Callable[[], Any]]  # preset name -> config
    # config -> the plain model (full shapes, torch layers, `.cfg`), built on the meta device
    build_model: Callable[[Any], nn.Module]
    # (config, parameter name, its full tensor) -> fills it in place: the initialisation, drawn one
    # whole parameter at a time in the model's order (so TP=n holds TP=1's weights sliced)
    init_weights: Callable[[Any, str, torch.Tensor], None]
    tp_plan: TPPlan
    loss: Callable[[Any, Callable, Any, torch.device], torch.Tensor]  # (cfg, model or engine, batch, device)
    # batch builder: (cfg, text_ids, frames [F, n, n], seed) -> tokens, targets, loss_mask of one sample;
    # `seed` is fixed per (run seed, epoch, sample), so an exact resume draws the same
    example: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    train_flops: Callable[[Any], float]  # per sample, forward + backward (throughput and MFU)
    # "module:function" making the sampler from sampling options (imported on use, no import cycle)
    sampler: str | None = None
    planner: PlannerModel | None = None  # None: cogvideo-plan refuses the family
    # "module:attribute" of its SwissArmyTransformer checkpoint layout (cogvideo/checkpoint/
    # sat_layout.py; imported on use): cogvideo-convert import-sat / export-sat. None: it has none
    sat_layout: str | None = None

    def preset(self, name: str):
        if name not in self.presets:
            raise ValueError(
                f"model.preset: unknown preset {name!r} (family {self.name}); known: {sorted(self.presets)}"
            )
        return self.presets[name]().validate()


REGISTRY: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.name in REGISTRY and REGISTRY[family.name] != family:
        raise ValueError(f"model family {family.name!r} is already registered")
    if any(f.config is family.config and f.name != family.name for f in REGISTRY.values()):
        raise ValueError(f"{family.config.__name__} already belongs to another family")
    REGISTRY[family.name] = family
    return family

"""Model families: what the trainer, the converter and the planner need to know about a model
(torchtitan's "train spec"). A family registers its config class and presets, a builder of the
plain model, its TP plan, the loss, the batch builder (a decoded shard sample -> the model's
training example) and its sampler; everything else reads them from here.

    family = family_of(model_cfg)                    # or get_family("cogvideo")
    model = build_model(model_cfg)                   # plain, then parallelized by the family's TP plan
    loss = family.loss(model_cfg, engine, batch, device)   # the trainer's step, whatever the family

CogVideo (stages backbone / 1 / 2) is registered at import; another family calls `register`.
The model section of every config names one: `model: {family: cogvideo, preset: small, ...fields}`
(`family` defaults to cogvideo).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cogvideo.tp_plan import TPPlan, parallelize

DEFAULT_FAMILY = "cogvideo"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    # the model config dataclass: validate(tensor_parallel), activation_checkpointing, and the video
    # shape fields the shard loader reads (text_length, num_frames, frame_tokens, vocab, stage)
    config: type
    presets: Mapping[str, Callable[[], Any]]  # preset name -> config
    build_model: Callable[[Any], nn.Module]  # config -> the plain model (full shapes, torch layers, `.cfg`)
    tp_plan: TPPlan
    loss: Callable[[Any, Callable, Any, torch.device], torch.Tensor]  # (cfg, model or engine, batch, device)
    # batch builder: (cfg, text_ids, frames [F, n, n], seed) -> tokens, targets, loss_mask of one sample;
    # `seed` is fixed per (run seed, epoch, sample), so an exact resume draws the same
    example: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    train_flops: Callable[[Any], float]  # per sample, forward + backward (throughput and MFU)
    sampler: Callable[..., Any] | None = None  # (options) -> what turns prompts into videos

    def preset(self, name: str):
        if name not in self.presets:
            raise ValueError(
                f"model.preset: unknown {self.name} preset {name!r}; known: {sorted(self.presets)}"
            )
        return self.presets[name]().validate()


_FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.name in _FAMILIES and _FAMILIES[family.name] != family:
        raise ValueError(f"model family {family.name!r} is already registered")
    if any(f.config is family.config and f.name != family.name for f in _FAMILIES.values()):
        raise ValueError(f"{family.config.__name__} already belongs to another family")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    _register_builtin()
    if name not in _FAMILIES:
        raise ValueError(f"model.family: unknown family {name!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def family_of(cfg) -> ModelFamily:
    """The family whose config class `cfg` is."""
    _register_builtin()
    for family in _FAMILIES.values():
        if type(cfg) is family.config:
            return family
    raise ValueError(f"no model family has config class {type(cfg).__name__}")


def build_model(cfg) -> nn.Module:
    """The model as training and sampling run it: the family's plain model, sharded by its TP
    plan over the current tensor-parallel group (if any), activation-checkpointed if configured."""
    family = family_of(cfg)
    return parallelize(family.build_model(cfg), family.tp_plan, cfg.activation_checkpointing)


def resolve_model_section(model: Mapping, tensor_parallel: int = 1):
    """A config's `model:` section ({family, preset, ...field overrides}) -> the family's config,
    checked for this TP degree. Errors name the key (`model.preset`, `model.<field>`)."""
    from cogvideo.configio import from_dict, merge, to_dict

    fields = dict(model)
    family = get_family(fields.pop("family", DEFAULT_FAMILY))
    preset = fields.pop("preset", None)
    if not isinstance(preset, str):
        raise ValueError(f"model.preset: required, one of {sorted(family.presets)}")
    data = merge(to_dict(family.preset(preset)), fields)
    return from_dict(family.config, data, prefix="model").validate(tensor_parallel)


def _register_builtin() -> None:
    if DEFAULT_FAMILY not in _FAMILIES:
        import cogvideo.model  # noqa: F401  (registers CogVideo)

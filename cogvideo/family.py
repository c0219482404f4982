"""Model families: what the trainer, the converter and the planner need to know about a model
(torchtitan's "train spec"). A family registers its config class and presets, a builder of the
plain model, its weight initialisation, its TP plan, the loss, the batch builder (a decoded shard
sample -> the model's training example), its sampler and its planner model (activation memory,
recompute FLOPs and tensor-parallel traffic for `cogvideo-plan`); everything else reads them from here.

    family = family_of(model_cfg)                    # or get_family("cogvideo")
    model = build_model(model_cfg)                   # plain on meta, parallelized, allocated, initialised
    loss = family.loss(model_cfg, engine, batch, device)   # the trainer's step, whatever the family

CogVideo (stages backbone / 1 / 2) is registered at import; the other shipped families
(`SHIPPED_FAMILIES`) when first named, since GLOBER's and HPDM's modules import diffusers (about
2 s of a process's start that a CogVideo run never needs); a user's family calls `register`.
The model section of every config names one: `model: {family: cogvideo, preset: small, ...fields}`.
A checkpoint records its model as the same section with every field spelled out
(`model_record` / `model_from_record`). Where `family` is absent (configs, and checkpoints
written before families were recorded) the model is CogVideo's: `DEFAULT_FAMILY`, here only.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping

import torch
from torch import nn

from cogvideo import parallel
from cogvideo.configio import from_dict, merge, to_dict
from cogvideo.family_spec import REGISTRY, ModelFamily, OptimizedPart, PlannerModel, register
from cogvideo.models import cogvideo as cogvideo_family  # registers CogVideo, the default family
from cogvideo.tp_plan import init_from_full, materialize, parallelize

__all__ = [
    "ModelFamily",
    "OptimizedPart",
    "any_preset",
    "families",
    "family_names",
    "PlannerModel",
    "build_model",
    "family_of",
    "get_family",
    "model_from_record",
    "model_record",
    "optimized_parts",
    "plain_model",
    "register",
    "resolve_model_section",
    "section_family",
]

DEFAULT_FAMILY = cogvideo_family.FAMILY.name
# The package that registers each shipped family, in the order presets are looked up.
SHIPPED_FAMILIES = {
    DEFAULT_FAMILY: cogvideo_family.__name__,
    "dsr": "cogvideo.models.dsr",
    "glober": "cogvideo.models.glober",
    "hpdm": "cogvideo.models.hpdm",
}


def family_names() -> list[str]:
    """Every family's name, loaded or not: the shipped ones first, then any a user registered."""
    return list(dict.fromkeys([*SHIPPED_FAMILIES, *REGISTRY]))


def get_family(name: str) -> ModelFamily:
    if name not in REGISTRY and name in SHIPPED_FAMILIES:
        importlib.import_module(SHIPPED_FAMILIES[name])
    if name not in REGISTRY:
        raise ValueError(f"model.family: unknown family {name!r}; known: {sorted(family_names())}")
    return REGISTRY[name]


def families() -> list[ModelFamily]:
    """Every family (the shipped ones imported now), in `family_names` order."""
    return [get_family(name) for name in family_names()]


def any_preset(name: str):
    """The preset `name` of whichever family has it (a command's `--base` / preset list); a
    family is imported only when the ones before it lack the name."""
    for family_name in family_names():
        family = get_family(family_name)
        if name in family.presets:
            return family.preset(name)
    known = sorted(p for f in families() for p in f.presets)
    raise ValueError(f"model.preset: unknown preset {name!r}; known: {known}")


def family_of(cfg) -> ModelFamily:
    """The family whose config class `cfg` is (registered: importing a config class imports its
    family's package)."""
    for family in REGISTRY.values():
        if type(cfg) is family.config:
            return family
    raise ValueError(f"no model family has config class {type(cfg).__name__}")


WHOLE_MODEL = "model"  # the one optimised part of a family that declares none


def optimized_parts(cfg) -> tuple[OptimizedPart, ...]:
    """The parts `cfg`'s family optimises separately, in turn order (`ModelFamily.parts`); a
    family that declares none trains one part: the whole model, named "model", by its loss."""
    family = family_of(cfg)
    parts = tuple(family.parts(cfg)) if family.parts is not None else ()
    if parts:
        return parts

    def loss(model_cfg, engines, batch, device):
        return family.loss(model_cfg, engines[WHOLE_MODEL], batch, device)

    return (OptimizedPart(WHOLE_MODEL, "", loss, lambda model_cfg: 1),)


def plain_model(cfg) -> nn.Module:
    """The family's plain model on the meta device: names, shapes and trainability, no memory."""
    with torch.device("meta"):
        return family_of(cfg).build_model(cfg)


def build_model(cfg, device: torch.device | str | None = None, init_weights: bool = True) -> nn.Module:
    """The model as training and sampling run it, built lean (torchtitan's order): the family's
    plain model on the meta device, sharded by its TP plan over the current tensor-parallel group
    (if any) and activation-checkpointed if configured, then allocated on `device` (default: this
    rank's, `parallel.device()`) and initialised by the family, one full parameter at a time.
    `init_weights=False` leaves the memory uninitialised, for a state dict to be loaded."""
    family = family_of(cfg)
    model = parallelize(plain_model(cfg), family.tp_plan, cfg.activation_checkpointing)
    materialize(model, parallel.device() if device is None else device)
    if init_weights:
        init_from_full(model, family.tp_plan, functools.partial(family.init_weights, cfg))
    return model


def resolve_model_section(model: Mapping, tensor_parallel: int = 1):
    """A config's `model:` section ({family, preset, ...field overrides}) -> the family's config,
    checked for this TP degree. Errors name the key (`model.preset`, `model.<field>`)."""
    family, fields = _family_and_fields(model)
    preset = fields.pop("preset", None)
    if not isinstance(preset, str):
        raise ValueError(f"model.preset: required, one of {sorted(family.presets)}")
    return _config(family, merge(to_dict(family.preset(preset)), fields), tensor_parallel)


def model_record(cfg) -> dict:
    """`cfg` as checkpoints record it: its model section with every field spelled out."""
    return {"family": family_of(cfg).name, **to_dict(cfg)}


def model_from_record(record: Mapping, tensor_parallel: int = 1):
    """Inverse of `model_record` (no preset: the record is complete), checked for this TP degree."""
    family, fields = _family_and_fields(record)
    return _config(family, fields, tensor_parallel)


def section_family(section: Mapping) -> ModelFamily:
    """The family a model section names (CogVideo where it names none)."""
    return _family_and_fields(section)[0]


def _family_and_fields(section: Mapping) -> tuple[ModelFamily, dict]:
    fields = dict(section)
    return get_family(fields.pop("family", DEFAULT_FAMILY)), fields


def _config(family: ModelFamily, fields: dict, tensor_parallel: int):
    return from_dict(family.config, fields, prefix="model").validate(tensor_parallel)

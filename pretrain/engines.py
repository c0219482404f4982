"""A run's optimised parts: one DeepSpeed engine per part of the model that its family optimises
separately (`cogvideo.family.optimized_parts`: a GAN's generator and discriminator), taking
optimizer steps in the family's turns. Most families have one part, "model", the whole model.

    engines = Engines.initialize(model, model_cfg, cfg)  # deepspeed.initialize per part
    part = engines.turn(step)                            # whose optimizer step `step` is
    with engines.training(part):                         # the other parts take no gradient
        loss = part.loss(model_cfg, engines.by_part, batch, device)

Each part's learning-rate schedule runs over its own share of training.max_steps. The engines
are saved and restored by `pretrain.checkpoint.CheckpointManager` (one folder per part within a
checkpoint tag; a one-part run keeps DeepSpeed's files in the tag itself).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from cogvideo import parallel
from cogvideo.family import WHOLE_MODEL, OptimizedPart, optimized_parts
from cogvideo.precision import torch_dtype
from pretrain.config import TrainConfig
from pretrain.optim import client_optimizer, deepspeed_config, lr_scheduler, param_groups


class Engines:
    def __init__(self, parts: tuple[OptimizedPart, ...], engines: dict, model_cfg):
        self.parts, self.by_part, self.model_cfg = parts, engines, model_cfg
        self.cycle = [part for part in parts for _ in range(part.steps(model_cfg))]

    @classmethod
    def initialize(cls, model: nn.Module, model_cfg, cfg: TrainConfig) -> "Engines":
        import deepspeed

        parts = optimized_parts(model_cfg)
        cycle = sum(part.steps(model_cfg) for part in parts)
        engines = {}
        for part in parts:
            module = model.get_submodule(part.module) if part.module else model
            steps = math.ceil(cfg.training.max_steps * part.steps(model_cfg) / cycle)
            optimizer = client_optimizer(module, cfg, parallel.tp_group())
            if optimizer is not None and optimizer.model_params is not None:  # it holds fp32 masters
                module.to(torch_dtype(cfg.parallel.precision))
            engines[part.name], _, _, _ = deepspeed.initialize(
                model=module,
                optimizer=optimizer,
                model_parameters=None if optimizer else param_groups(module, cfg.optim.weight_decay),
                config=deepspeed_config(cfg, parallel.dp_size()),
                mpu=parallel.mpu(),
                lr_scheduler=lr_scheduler(cfg, steps),
            )
            if optimizer is not None and parallel.dp_size() == 1:
                # nothing to average: at ZeRO-0 DeepSpeed would flatten every gradient, all-reduce
                # it over the one rank and copy it back after each backward
                engines[part.name].enable_backward_allreduce = False
        return cls(parts, engines, model_cfg)

    def modules(self) -> dict[str, nn.Module]:
        """{name prefix in the model ("" for the whole): module} of every optimised part."""
        return {(f"{p.module}." if p.module else ""): self.by_part[p.name].module for p in self.parts}

    @property
    def whole(self) -> bool:
        """One part, the whole model: the checkpoint layout of a single engine."""
        return list(self.by_part) == [WHOLE_MODEL]

    @property
    def first(self):
        return next(iter(self.by_part.values()))

    def turn(self, step: int) -> OptimizedPart:
        """The part whose optimizer takes step `step` (0-based, counted over the whole run)."""
        return self.cycle[step % len(self.cycle)]

    @contextmanager
    def training(self, part: OptimizedPart) -> Iterator[None]:
        """While `part` steps, the other parts' trainable parameters take no gradient (their
        engines' gradient hooks stay quiet, and their optimizers see nothing)."""
        frozen = [
            p
            for name, engine in self.by_part.items()
            if name != part.name
            for p in engine.module.parameters()
            if p.requires_grad
        ]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def destroy(self) -> None:
        for engine in self.by_part.values():
            engine.destroy()

"""The run's own training step in a given precision, for `parallel.precision: auto` to time
(cogvideo.precision.choose_precision decides from it).

One step is the trainer's: the run's model in a DeepSpeed engine configured as the run's
(ZeRO stage, optimizer, clipping, the precision under test: bf16/fp16 with fp32 master weights),
fed one of the run's own batches `training.grad_accum_steps` times through the family's loss,
`engine.backward` and `engine.step` (gradient reduction over the data-parallel ranks included).
Left out is what costs every precision alike: the loader thread, metrics, checkpoints. The model
is the run's (TP shards included) cut to at most PROBE_MAX_LAYERS layers so that a large run's
probe stays small; it is drawn from the seed (never from init.* weights) and freed once timed.
"""

from __future__ import annotations

import dataclasses

from cogvideo import parallel
from cogvideo.precision import PROBE_MAX_LAYERS, split_step_name
from cogvideo.sdpa import fp32_attention
from pretrain.config import TrainConfig, resolved_zero_stage
from pretrain.data import Batch, ShardLoader
from pretrain.engines import Engines


def probe_batch(cfg: TrainConfig, model_cfg, shards: list[str], encode_text) -> Batch:
    """This rank's first batch of the run's shards (read in shard order by a loader of its own:
    the run's loader and its position are untouched)."""
    loader = ShardLoader(
        shards,
        model_cfg,
        encode_text,
        dataclasses.replace(cfg.data, shuffle_buffer=0),
        micro_batch_size=cfg.training.micro_batch_size,
        seed=cfg.training.seed,
        dp_rank=parallel.dp_rank(),
        dp_size=parallel.dp_size(),
    )
    return next(loader.batches())


def precision_config(cfg: TrainConfig, name: str) -> TrainConfig:
    """The run's config training in precision `name` (at the ZeRO stage it takes in `name`)."""
    stage = resolved_zero_stage(cfg.parallel, parallel.dp_size(), name)
    return dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, precision=name, zero_stage=stage)
    )


class StepProbe:
    """``probe(name)`` runs one training step in precision ``name`` (an engine per precision,
    built on first use; ``close()`` frees them). Collective under torch.distributed: every rank
    calls it alike."""

    def __init__(self, cfg: TrainConfig, model_cfg, batch: Batch):
        self.cfg, self.batch = cfg, batch
        cut = "num_layers" in {f.name for f in dataclasses.fields(model_cfg) if f.init}  # else derived
        self.model_cfg = (
            dataclasses.replace(model_cfg, num_layers=min(model_cfg.num_layers, PROBE_MAX_LAYERS))
            if cut
            else model_cfg
        )
        self.engines: dict = {}

    def engine(self, name: str) -> Engines:
        """The DeepSpeed engines of precision `name` (as the trainer builds its own: one per
        optimised part)."""
        from cogvideo.family import build_model

        if name not in self.engines:
            cfg = precision_config(self.cfg, name)
            parallel.manual_seed(cfg.training.seed)
            self.engines[name] = Engines.initialize(build_model(self.model_cfg), self.model_cfg, cfg)
        return self.engines[name]

    def __call__(self, step_name: str) -> None:
        """One step of every optimised part (`step_name`: a cogvideo.precision.STEP_NAMES entry)."""
        name, in_fp32 = split_step_name(step_name)
        engines = self.engine(name)
        for part in engines.parts:
            engine = engines.by_part[part.name]
            with engines.training(part), fp32_attention(in_fp32):
                for _ in range(self.cfg.training.grad_accum_steps):
                    loss = part.loss(self.model_cfg, engines.by_part, self.batch, engine.device)
                    engine.backward(loss)
                    engine.step()

    def close(self) -> None:
        for engines in self.engines.values():
            engines.destroy()
        self.engines.clear()

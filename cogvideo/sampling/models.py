"""What every family's sampling pipeline does before it samples: join the parallel state under a
launcher, name its device, resolve its precision, and load a converted checkpoint as an eval-mode
model of the kind it expects."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from cogvideo import parallel


def join_parallel(tensor_parallel: int) -> None:
    """Under torchrun (or with TP > 1) the processes join the same parallel state as training: TP
    ranks share a model, data-parallel groups split the prompts."""
    if tensor_parallel > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parallel.init_distributed(tensor_parallel)


def sampling_device(device: str) -> str:
    """The `device` option as torch names it: "cuda" is this rank's GPU."""
    return f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device


def width_precision(dtype: str, device: str, checkpoint: str | Path, rows: Callable[[object], int]):
    """`dtype` resolved on `device` for the model in `checkpoint` (a PrecisionChoice; `auto`: by a
    product of the model's width, `rows(config)` rows: `cogvideo.precision.choose_precision`)."""
    from cogvideo.checkpoint import load_model_config
    from cogvideo.precision import choose_precision, probe_shape

    cfg = load_model_config(Path(checkpoint))
    return choose_precision(
        dtype, sampling_device(device), probe_shape(rows(cfg), cfg.hidden_size, cfg.ffn_size)
    )


def load_eval_model(
    path: str | Path, device: str, tensor_parallel: int, mismatch: Callable[[object], str | None]
):
    """(model in eval mode on `device`, its config) of the converted checkpoint `path`, this TP
    rank's shard; ValueError naming the file when `mismatch(config)` says what the model is not."""
    from cogvideo.checkpoint import load_model_config, load_model_state
    from cogvideo.family import build_model

    path = Path(path)
    cfg = load_model_config(path).validate(tensor_parallel)
    problem = mismatch(cfg)
    if problem:
        raise ValueError(f"{path}: {problem}")
    model = build_model(cfg.replace(activation_checkpointing=False), device, init_weights=False)
    model.load_state_dict(load_model_state(path, parallel.tp_rank(), parallel.tp_size()))
    return model.eval(), cfg

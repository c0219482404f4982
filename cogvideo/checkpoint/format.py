"""Our checkpoint format (described in the package docstring): write, read, validate, reshard."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from cogvideo.checkpoint.io import (
    DEFAULT_SHARD_BYTES,
    CheckpointError,
    ShardedReader,
    ShardedWriter,
    atomic_output_dir,
    read_json,
    write_json,
)
from cogvideo.config import ModelConfig
from cogvideo.configio import ConfigError, from_dict, to_dict
from cogvideo.model import TP_PLAN
from cogvideo.precision import NAMES
from cogvideo.text_format import TextFormat, TextFormatError

FORMAT = "cogvideo"
VERSION = 1
CONFIG_NAME = "config.json"
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_STATE = "state.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def rank_dir(path: Path, rank: int) -> Path:
    return path / f"tp_rank_{rank:02d}"


# ---- per-tensor TP helpers (the model's TP plan) ------------------------------------------


def shard_tensor(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    try:
        return TP_PLAN.shard_tensor(name, tensor, rank, size)
    except ValueError as err:
        raise CheckpointError(
            f"{name}: cannot split {tuple(tensor.shape)} over {size} TP ranks ({err})"
        ) from None


def merge_tensor(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    return TP_PLAN.merge_tensor(name, parts)


def full_shape(name: str, local_shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    return TP_PLAN.full_shape(name, local_shape, tp)


def is_trainable(name: str, cfg: ModelConfig) -> bool:
    """As CogVideoModel sets requires_grad: video stages freeze the backbone unless told not to."""
    from cogvideo.model import is_backbone_param

    return not cfg.has_temporal or cfg.train_backbone or not is_backbone_param(name)


# ---- validation against the model --------------------------------------------------------


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) parameter shapes of CogVideoModel(cfg), from the plain model on the meta device."""
    from cogvideo.family import family_of

    with torch.device("meta"):
        model = family_of(cfg).build_model(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_shapes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, where: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    expected = expected_shapes(cfg)
    missing = [n for n in expected if n not in shapes]
    extra = [n for n in shapes if n not in expected]
    wrong = [
        f"{n}: {tuple(shapes[n])} (model wants {expected[n]})"
        for n in expected
        if n in shapes and tuple(shapes[n]) != expected[n]
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", extra), ("shape mismatches", wrong)):
        if items:
            problems.append(
                f"{label} ({len(items)}): {', '.join(items[:20])}{' ...' if len(items) > 20 else ''}"
            )
    if problems:
        raise CheckpointError(
            f"{where}: does not fit model {cfg.name!r} (stage {cfg.stage}): " + "; ".join(problems)
        )


# ---- writing -----------------------------------------------------------------------------


def write_checkpoint(
    path: str | Path,
    cfg: ModelConfig,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    iteration: int = 0,
    tensor_parallel: int = 1,
    force: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    source: str = "",
    optimizer: tuple[dict, Iterable[tuple[str, torch.Tensor]]] | None = None,
    text_format: TextFormat = TextFormat(),
) -> Path:
    """Stream full tensors (name, tensor) into a checkpoint at `path`, split over
    `tensor_parallel` ranks. `shapes` (full shapes of every tensor to come) is checked against
    the model before anything is written. `optimizer` is (state.json dict, full Adam tensors
    named "exp_avg.<param>" / "exp_avg_sq.<param>"). `text_format` is the one the model was
    trained on (the release's for imported weights)."""
    path = Path(path)
    try:
        cfg.validate(tensor_parallel)
    except ValueError as err:
        raise CheckpointError(f"cannot write {path} at TP={tensor_parallel}: {err}") from None
    check_shapes(shapes, cfg, f"weights for {path}")
    with atomic_output_dir(path, force) as tmp:
        dirs = [tmp] if tensor_parallel == 1 else [rank_dir(tmp, r) for r in range(tensor_parallel)]
        writers = [
            ShardedWriter(d, max_shard_bytes, {"format": FORMAT, "tp_rank": r}) for r, d in enumerate(dirs)
        ]
        seen, stored_dtype = set(), None
        for name, tensor in tensors:
            if tuple(tensor.shape) != tuple(shapes.get(name, ())):
                raise CheckpointError(
                    f"{name}: source gave shape {tuple(tensor.shape)}, announced {shapes.get(name)}"
                )
            seen.add(name)
            tensor = tensor if dtype is None else tensor.to(dtype)
            stored_dtype = stored_dtype or tensor.dtype
            for rank, writer in enumerate(writers):
                writer.add(name, shard_tensor(name, tensor, rank, tensor_parallel))
        if seen != set(shapes):
            raise CheckpointError(f"source ended without tensors: {sorted(set(shapes) - seen)[:20]}")
        for writer in writers:
            writer.close()
        if optimizer is not None:
            state, moments = optimizer
            writer = ShardedWriter(tmp / OPTIMIZER_DIR, max_shard_bytes, {"format": FORMAT})
            for name, tensor in moments:
                writer.add(name, tensor)
            writer.close()
            write_json(tmp / OPTIMIZER_DIR / OPTIMIZER_STATE, state)
        write_json(
            tmp / CONFIG_NAME,
            {
                "format": FORMAT,
                "version": VERSION,
                "model": to_dict(cfg),
                "iteration": int(iteration),
                "tensor_parallel": tensor_parallel,
                "dtype": NAMES.get(stored_dtype, str(stored_dtype)),
                "num_parameters": sum(math.prod(s) for s in shapes.values()),
                "source": source,
                "text_format": text_format.to_dict(),
            },
        )
    return path


def save_model_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    iteration: int = 0,
    tensor_parallel: int = 1,
    force: bool = False,
    **options,
) -> Path:
    """Save a full (merged) state dict in our format, split over `tensor_parallel` ranks."""
    shapes = {name: tuple(t.shape) for name, t in state_dict.items()}
    return write_checkpoint(
        path,
        cfg,
        shapes,
        state_dict.items(),
        iteration=iteration,
        tensor_parallel=tensor_parallel,
        force=force,
        **options,
    )


# ---- reading -----------------------------------------------------------------------------


class Checkpoint:
    """An opened checkpoint of our format. Opening checks it is complete and consistent."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.info = read_checkpoint_info(self.path)
        self.tensor_parallel = self.info["tensor_parallel"]
        self.iteration = self.info["iteration"]
        self.cfg = _model_config(self.info, self.path)
        dirs = (
            [self.path]
            if self.tensor_parallel == 1
            else [rank_dir(self.path, r) for r in range(self.tensor_parallel)]
        )
        for d in dirs:
            if not d.is_dir():
                raise CheckpointError(
                    f"{d}: missing (config.json says tensor_parallel={self.tensor_parallel})"
                )
        self.readers = [ShardedReader(d) for d in dirs]
        names = self.readers[0].names()
        for rank, reader in enumerate(self.readers[1:], start=1):
            if set(reader.names()) != set(names):
                diff = sorted(set(names) ^ set(reader.names()))
                raise CheckpointError(f"{dirs[rank]}: tensor names differ from TP rank 0: {diff[:20]}")
            for name in names:
                if reader.shape(name) != self.readers[0].shape(name):
                    raise CheckpointError(
                        f"{dirs[rank]}: {name} has shape {reader.shape(name)}, "
                        f"TP rank 0 has {self.readers[0].shape(name)}"
                    )
        self.shapes = {n: full_shape(n, self.readers[0].shape(n), self.tensor_parallel) for n in names}

    def names(self) -> list[str]:
        return list(self.shapes)

    def full(self, name: str) -> torch.Tensor:
        return merge_tensor(name, [reader.get(name) for reader in self.readers])

    def local(self, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        if tp_size == self.tensor_parallel:
            return self.readers[tp_rank].get(name)
        return shard_tensor(name, self.full(name), tp_rank, tp_size)

    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.full(name)

    def has_optimizer(self) -> bool:
        return (self.path / OPTIMIZER_DIR).is_dir()


def read_checkpoint_info(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    info = read_json(path / CONFIG_NAME, "checkpoint config")
    if info.get("format") != FORMAT:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: format is {info.get('format')!r}, expected {FORMAT!r} "
            f"(convert other checkpoints with cogvideo-convert)"
        )
    if info.get("version") != VERSION:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: version {info.get('version')!r} is not supported (wants {VERSION})"
        )
    for key in ("model", "iteration", "tensor_parallel"):
        if key not in info:
            raise CheckpointError(f"{path / CONFIG_NAME}: field {key!r} missing")
    tp = info["tensor_parallel"]
    if not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"{path / CONFIG_NAME}: tensor_parallel must be a positive integer, got {tp!r}")
    return info


def _model_config(info: dict, path: Path) -> ModelConfig:
    try:
        return from_dict(ModelConfig, info["model"], prefix="model").validate()
    except (ConfigError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: {err}") from None


def load_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    return _model_config(read_checkpoint_info(path), path)


def load_text_format(path: str | Path) -> TextFormat:
    """The text format the checkpoint's model was trained on; the release's when config.json
    predates the field."""
    path = Path(path)
    data = read_checkpoint_info(path).get("text_format")
    if data is None:
        return TextFormat()
    try:
        return TextFormat.from_dict(data, f"{path / CONFIG_NAME}: text_format")
    except (TextFormatError, TypeError) as err:
        raise CheckpointError(str(err)) from None


def load_model_state(path: str | Path, tp_rank: int = 0, tp_size: int = 1) -> dict[str, torch.Tensor]:
    """This TP rank's local state dict, whatever TP degree the checkpoint was stored at."""
    ckpt = Checkpoint(path)
    try:
        ckpt.cfg.validate(tp_size)
    except ValueError as err:
        raise CheckpointError(f"{path}: cannot load at TP={tp_size}: {err}") from None
    if not 0 <= tp_rank < tp_size:
        raise CheckpointError(f"tp_rank={tp_rank} outside [0, {tp_size})")
    check_shapes(ckpt.shapes, ckpt.cfg, str(path))
    return {name: ckpt.local(name, tp_rank, tp_size) for name in ckpt.names()}


def load_optimizer_state(path: str | Path, tp_rank: int = 0, tp_size: int = 1) -> dict:
    """{"state": state.json contents, "exp_avg": {param: local tensor}, "exp_avg_sq": {...}}."""
    path = Path(path)
    directory = path / OPTIMIZER_DIR
    if not directory.is_dir():
        raise CheckpointError(f"{path}: holds no optimizer state ({OPTIMIZER_DIR}/ missing)")
    out = {"state": read_json(directory / OPTIMIZER_STATE, "optimizer state"), **{k: {} for k in ADAM_KEYS}}
    reader = ShardedReader(directory)
    for key in reader.names():
        kind, param = key.split(".", 1)
        out[kind][param] = shard_tensor(param, reader.get(key), tp_rank, tp_size)
    return out


def reshard(
    src: str | Path,
    dst: str | Path,
    tensor_parallel: int,
    force: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    optimizer: bool = True,
) -> Path:
    """Split or merge a checkpoint to another TP degree (tensor by tensor; exact). The optimizer
    state (full tensors) is copied unless `optimizer` is False."""
    ckpt = Checkpoint(src)
    if Path(dst).resolve() == ckpt.path.resolve():
        raise CheckpointError(f"{dst}: output must differ from the input")
    moments = None
    if optimizer and ckpt.has_optimizer():
        reader = ShardedReader(ckpt.path / OPTIMIZER_DIR)
        state = read_json(ckpt.path / OPTIMIZER_DIR / OPTIMIZER_STATE, "optimizer state")
        moments = (state, ((n, reader.get(n)) for n in reader.names()))
    return write_checkpoint(
        dst,
        ckpt.cfg,
        ckpt.shapes,
        ckpt.full_tensors(),
        iteration=ckpt.iteration,
        tensor_parallel=tensor_parallel,
        force=force,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        source=f"reshard of {ckpt.path}",
        optimizer=moments,
        text_format=load_text_format(ckpt.path),
    )

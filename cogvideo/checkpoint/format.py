"""Our checkpoint format (described in the package docstring): write, read, validate, reshard.

Tensors split over TP ranks by the TP plan of the model's family (`family_of(cfg).tp_plan`), which
config.json records with the model (`cogvideo.family.model_record`)."""

from __future__ import annotations

import dataclasses
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
from cogvideo.configio import ConfigError
from cogvideo.family import family_of, model_from_record, model_record, plain_model
from cogvideo.precision import NAMES
from cogvideo.text_format import TextFormat, TextFormatError
from cogvideo.tp_plan import TPPlan, Vocab

FORMAT = "cogvideo"
VERSION = 1
CONFIG_NAME = "config.json"
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_STATE = "state.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def rank_dir(path: Path, rank: int) -> Path:
    return path / f"tp_rank_{rank:02d}"


def plan_of(cfg) -> TPPlan:
    return family_of(cfg).tp_plan


def shard_tensor(plan: TPPlan, name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    try:
        return plan.shard_tensor(name, tensor, rank, size)
    except ValueError as err:
        raise CheckpointError(
            f"{name}: cannot split {tuple(tensor.shape)} over {size} TP ranks ({err})"
        ) from None


def full_shapes(plan: TPPlan, local: dict[str, tuple[int, ...]], tp: int) -> dict[str, tuple[int, ...]]:
    """Full shapes of tensors stored split over `tp` ranks (`local`: rank 0's shapes)."""
    return {name: plan.full_shape(name, shape, tp) for name, shape in local.items()}


# ---- validation against the model --------------------------------------------------------


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) parameter shapes of the family's plain model for `cfg`, built on the meta device."""
    return {name: tuple(t.shape) for name, t in plain_model(cfg).state_dict().items()}


def trainable_names(cfg) -> set[str]:
    """The parameters the model trains (video stages freeze the backbone unless told not to)."""
    return {name for name, p in plain_model(cfg).named_parameters() if p.requires_grad}


def check_shapes(shapes: dict[str, tuple[int, ...]], cfg, where: str) -> None:
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


# ---- vocabulary padding (Megatron's make-vocab-size-divisible-by) --------------------------


@dataclasses.dataclass(frozen=True)
class VocabResize:
    """The rows of every vocabulary tensor (the TP plan's `Vocab` layers, and their Adam moments)
    padded with zeros to `new` rows, or cut to them. The rows past the vocabulary layout's
    `min_vocab_size` are padding: no sequence holds those ids, the loss's classes and the
    sampler's logits stop at the image codes (cogvideo/vocab.py), so their values never matter."""

    plan: TPPlan
    old: int
    new: int

    @classmethod
    def of(cls, cfg, vocab_size: int | None):
        """(cfg at `vocab_size`, the resize), or (cfg, None) when the size is kept."""
        if vocab_size is None or vocab_size == cfg.vocab.vocab_size:
            return cfg, None
        if vocab_size < cfg.vocab.min_vocab_size:
            raise CheckpointError(
                f"vocab_size={vocab_size} would drop ids in use: the vocabulary uses ids "
                f"0..{cfg.vocab.min_vocab_size - 1} (image codes, text pieces, special tokens); only "
                f"padding rows (ids >= {cfg.vocab.min_vocab_size}) can be dropped"
            )
        resized = dataclasses.replace(cfg, vocab=dataclasses.replace(cfg.vocab, vocab_size=vocab_size))
        return resized, cls(plan_of(cfg), cfg.vocab.vocab_size, vocab_size)

    def applies(self, name: str, shape: tuple[int, ...]) -> bool:
        vocab_layer = isinstance(self.plan.style(name.rpartition(".")[0]), Vocab)
        return vocab_layer and len(shape) > 0 and shape[0] == self.old

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.new, *shape[1:]) if self.applies(name, shape) else tuple(shape)

    def tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not self.applies(name, tuple(tensor.shape)):
            return tensor
        if self.new < self.old:
            return tensor[: self.new]
        return torch.cat([tensor, tensor.new_zeros(self.new - self.old, *tensor.shape[1:])])


def _transformed(stream, resize: VocabResize | None, dtype: torch.dtype | None):
    for name, tensor in stream:
        tensor = resize.tensor(name, tensor) if resize else tensor
        yield name, tensor if dtype is None else tensor.to(dtype)
        del tensor  # not held while the source reads the next one


# ---- writing -----------------------------------------------------------------------------


def write_checkpoint(
    path: str | Path,
    cfg,
    shapes: dict[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    iteration: int = 0,
    tensor_parallel: int = 1,
    force: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    vocab_size: int | None = None,
    source: str = "",
    optimizer: tuple[dict, Iterable[tuple[str, torch.Tensor]]] | None = None,
    text_format: TextFormat = TextFormat(),
) -> Path:
    """Stream full tensors (name, tensor) into a checkpoint at `path`, split over
    `tensor_parallel` ranks. `shapes` (full shapes of every tensor to come) is checked against
    the model before anything is written. `vocab_size` pads or cuts the vocabulary rows
    (`VocabResize`). `optimizer` is (state.json dict, full Adam tensors named
    "exp_avg.<param>" / "exp_avg_sq.<param>"). `text_format` is the one the model was trained on
    (the release's for imported weights)."""
    path = Path(path)
    cfg, resize = VocabResize.of(cfg, vocab_size)
    if resize:
        shapes = {name: resize.shape(name, shape) for name, shape in shapes.items()}
    try:
        cfg.validate(tensor_parallel)
    except ValueError as err:
        raise CheckpointError(f"cannot write {path} at TP={tensor_parallel}: {err}") from None
    check_shapes(shapes, cfg, f"weights for {path}")
    with atomic_output_dir(path, force) as tmp:
        stream = _transformed(tensors, resize, dtype)
        stored_dtype = _write_weights(tmp, plan_of(cfg), shapes, stream, tensor_parallel, max_shard_bytes)
        if optimizer is not None:
            state, moments = optimizer
            writer = ShardedWriter(tmp / OPTIMIZER_DIR, max_shard_bytes, {"format": FORMAT})
            for name, tensor in _transformed(moments, resize, None):
                writer.add(name, tensor)
            writer.close()
            write_json(tmp / OPTIMIZER_DIR / OPTIMIZER_STATE, state)
        info = {
            "format": FORMAT,
            "version": VERSION,
            "model": model_record(cfg),
            "iteration": int(iteration),
            "tensor_parallel": tensor_parallel,
            "dtype": NAMES.get(stored_dtype, str(stored_dtype)),
            "num_parameters": sum(math.prod(s) for s in shapes.values()),
            "source": source,
            "text_format": text_format.to_dict(),
        }
        write_json(tmp / CONFIG_NAME, info)
    return path


def _write_weights(
    tmp: Path, plan: TPPlan, shapes: dict, tensors, tensor_parallel: int, max_shard_bytes: int
):
    """Every tensor split over the rank folders (or `tmp` itself at TP 1); the stored dtype."""
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
        stored_dtype = stored_dtype or tensor.dtype
        for rank, writer in enumerate(writers):
            writer.add(name, shard_tensor(plan, name, tensor, rank, tensor_parallel))
        del tensor  # the next full tensor is read after this one is freed
    if seen != set(shapes):
        raise CheckpointError(f"source ended without tensors: {sorted(set(shapes) - seen)[:20]}")
    for writer in writers:
        writer.close()
    return stored_dtype


def save_model_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    cfg,
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
        self.plan = plan_of(self.cfg)
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
        local = {n: self.readers[0].shape(n) for n in names}
        self.shapes = full_shapes(self.plan, local, self.tensor_parallel)

    def names(self) -> list[str]:
        return list(self.shapes)

    def full(self, name: str) -> torch.Tensor:
        return self.plan.merge_tensor(name, [reader.get(name) for reader in self.readers])

    def local(self, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        if tp_size == self.tensor_parallel:
            return self.readers[tp_rank].get(name)
        return shard_tensor(self.plan, name, self.full(name), tp_rank, tp_size)

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


def _model_config(info: dict, path: Path):
    try:
        return model_from_record(info["model"])
    except (ConfigError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: {err}") from None


def load_model_config(path: str | Path):
    """The model config the checkpoint records, of its family's config class."""
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
    plan = plan_of(load_model_config(path))
    reader = ShardedReader(directory)
    for key in reader.names():
        kind, param = key.split(".", 1)
        out[kind][param] = shard_tensor(plan, param, reader.get(key), tp_rank, tp_size)
    return out


def reshard(
    src: str | Path, dst: str | Path, tensor_parallel: int, *, optimizer: bool = True, **write
) -> Path:
    """Split or merge a checkpoint to another TP degree (tensor by tensor; exact). The optimizer
    state (full tensors) is copied unless `optimizer` is False. `write`: `write_checkpoint`'s
    force, dtype, max_shard_bytes, vocab_size."""
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
        source=f"reshard of {ckpt.path}",
        optimizer=moments,
        text_format=load_text_format(ckpt.path),
        **write,
    )

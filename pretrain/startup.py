"""What the trainer checks before any process group starts (a problem is one line, exit 2).

The config, the text tokenizer, the shards per DP rank, caption lengths, the starting weights
(`init.weights` / `init.backbone` of our format open whole) and the checkpoints to resume from
(whole: `cogvideo.checkpoint.training.resume_candidates`; their contents are verified against
their digests by all ranks together once the process group is up: `CheckpointManager.verified`).
Under `cogvideo-train --nproc-per-node` the launcher runs these checks once and says what they
found; its ranks run them again quietly.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from cogvideo.checkpoint import Checkpoint, CheckpointError
from cogvideo.checkpoint.format import CONFIG_NAME
from cogvideo.checkpoint.training import resume_candidates
from cogvideo.configio import ConfigError
from cogvideo.family import family_of
from cogvideo.params import count_parameters
from pretrain.checkpoint import PARTS, CheckpointManager, estimated_bytes, free_bytes
from pretrain.config import TrainConfig, check_config, check_text_tokenizer, load_train_config
from pretrain.data import check_shard_kind, check_shards, check_text_length, expand_shards
from pretrain.launch import CHECKED_VAR

log = logging.getLogger("pretrain")

EXIT_BAD_CONFIG = 2


@dataclass
class ResumePlan:
    """The checkpoints a run may resume from, best first; `explicit`: a path was named (no fallback)."""

    candidates: list[Path]
    explicit: bool


def quiet() -> bool:
    return os.environ.get("RANK", "0") != "0" or os.environ.get(CHECKED_VAR) == "1"


def say(message: str) -> None:
    """Start-up progress, from global rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        log.info(message)


def warn(message: str) -> None:
    """What the checks found, once: from the launcher, or from global rank 0 when there is none."""
    if not quiet():
        log.warning(message)


def model_label(model_cfg) -> str:
    """The model's family and name (and CogVideo's stage) for the log."""
    family = family_of(model_cfg).name
    stage = getattr(model_cfg, "stage", None)
    return f"{family} {model_cfg.name}" + (f" ({stage})" if stage else "")


def text_encoder(cfg: TrainConfig, model_cfg):
    """Caption text -> the model's text ids; no ids for a model that reads no text."""
    from cogvideo.tokenizers.text import TextTokenizer

    if not family_of(model_cfg).reads_text(model_cfg):
        return no_text
    return TextTokenizer(cfg.data.text_tokenizer, model_cfg.vocab).encode


def no_text(text: str) -> list[int]:
    return []


def dry_run(args: argparse.Namespace) -> None:
    """The launch scripts' --dry-run: the config checks that need neither data nor ranks."""
    try:
        cfg = load_train_config(args.config, list(args.overrides))
        model_cfg = check_config(cfg, args.dry_run, has_gpu=True)
    except (ConfigError, FileNotFoundError, yaml.YAMLError) as err:
        print(f"cogvideo-train: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    tp = cfg.parallel.tensor_parallel
    print(
        f"cogvideo-train: config valid for {args.dry_run} ranks (TP {tp} x DP {args.dry_run // tp}), "
        f"model {model_label(model_cfg)}, precision {cfg.parallel.precision}"
    )


def check_starting_weights(cfg: TrainConfig) -> None:
    """init.weights / init.backbone in our format open whole: every file is there and every
    header reads (a SwissArmyTransformer backbone is read when it is loaded)."""
    for key, path in (("init.weights", cfg.init.weights), ("init.backbone", cfg.init.backbone)):
        if path and (key == "init.weights" or (Path(path) / CONFIG_NAME).is_file()):
            try:
                Checkpoint(path)
            except CheckpointError as err:
                raise CheckpointError(f"{key}: {err}") from None


def _frozen_by(model_cfg) -> str:
    """What froze them, where a config field says so (CogVideo's backbone)."""
    fields = {f.name for f in dataclasses.fields(model_cfg)}
    return ": model.train_backbone=false" if "train_backbone" in fields else " by the model family"


def checkpoint_manager(cfg: TrainConfig, model_cfg, parts: dict | None = None) -> CheckpointManager:
    """The run's checkpoint manager; `parts` default to the trainer's, unattached (for checks)."""
    counts = count_parameters(model_cfg)
    return CheckpointManager(
        cfg.checkpoint.dir,
        cfg.checkpoint.keep_last,
        cfg.checkpoint.export_full,
        parts if parts is not None else {name: (None, scope) for name, scope in PARTS.items()},
        estimated_bytes(counts.total, counts.trainable, cfg.parallel.precision, cfg.checkpoint.export_full),
        model_cfg,
    )


def check_free_space(manager: CheckpointManager) -> None:
    """Warn before starting when checkpoint.dir cannot take one more checkpoint."""
    free, need = free_bytes(manager.root), manager.checkpoint_bytes()
    if free < need:
        warn(
            f"checkpoint.dir {manager.root}: {free:,} bytes free, less than one checkpoint (about "
            f"{need:,} bytes): saving will fail unless space is freed there"
        )


def resume_plan(cfg: TrainConfig, manager: CheckpointManager, dp_size: int) -> ResumePlan | None:
    """The checkpoints to resume from that are whole, newest first; notes on those skipped."""
    candidates, notes = resume_candidates(
        cfg.checkpoint.dir, cfg.checkpoint.resume, lambda path: manager.check(path, dp_size, cfg.parallel)
    )
    for note in notes:
        warn(note)
    if cfg.checkpoint.resume is None:
        return None
    return ResumePlan(candidates, explicit=cfg.checkpoint.resume != "auto")


def preflight(args: argparse.Namespace, world_size: int):
    """Every check that needs no process group. Returns (cfg, model config, shards, text
    encoder, ResumePlan or None)."""
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_train_config(args.config, overrides)
    model_cfg = check_config(cfg, world_size)
    check_text_tokenizer(cfg, model_cfg)
    shards = expand_shards(cfg.data.shards)
    dp_size = world_size // cfg.parallel.tensor_parallel
    encode = text_encoder(cfg, model_cfg)
    for line in check_shards(shards, cfg.training.seed, dp_size):
        warn(f"unreadable shard, skipped in training: {line}")
    check_shard_kind(shards, model_cfg)
    if family_of(model_cfg).reads_text(model_cfg):
        summary = check_text_length(shards, model_cfg, encode, cfg.data)
        if not quiet():
            log.info(summary)
    check_starting_weights(cfg)
    manager = checkpoint_manager(cfg, model_cfg)
    resume = resume_plan(cfg, manager, dp_size)
    check_free_space(manager)
    counts = count_parameters(model_cfg)
    if not quiet():
        log.info(
            f"model {model_label(model_cfg)}: {counts.trainable:,} of {counts.total:,} parameters train"
            + ("" if counts.frozen == 0 else f" ({counts.frozen:,} frozen{_frozen_by(model_cfg)})")
        )
    return cfg, model_cfg, shards, encode, resume

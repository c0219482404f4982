"""The training-checkpoint layout: the one module that names its files and folders.

    {dir}/step00000400/           one checkpoint ("tag")
        mp_rank_XX_model_states.pt, *optim_states.pt   DeepSpeed (all ranks write)
        {part}/mp_rank_XX_model_states.pt, ...         instead, for a model trained as several
                                  optimised parts (cogvideo.family.optimized_parts): each part's
                                  engine in its own folder
        {part}_dp{r}.pt           a stateful part kept per data-parallel rank (the loader)
        {part}_rank{r}.pt         a stateful part kept per global rank (RNG states, the
                                  model-parallel one of attention dropout included)
        train_config.yaml         the resolved training config
        COMPLETE                  written after every rank finished (barrier)
    {dir}/latest                  the tag of the newest complete checkpoint
    {dir}/LOCK                    the live run writing here (host, pid, SLURM job id)

The trainer (`pretrain/checkpoint.py`) writes this layout, the ZeRO converter
(`cogvideo/checkpoint/zero.py`) reads it; both take every name from here. Every file of a part
is read with ``torch.load(weights_only=True)``: nothing in a checkpoint directory can run code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from cogvideo.checkpoint.io import CheckpointError, load_pt
from cogvideo.config import ModelConfig
from cogvideo.family import WHOLE_MODEL, optimized_parts, resolve_model_section
from cogvideo.precision import DTYPES
from cogvideo.text_format import TextFormat, TextFormatError

COMPLETE = "COMPLETE"
LATEST = "latest"
LOCK = "LOCK"
TRAIN_CONFIG = "train_config.yaml"
FULL_MODEL = "model_full.pt"
TAG = re.compile(r"^step(\d{8})$")
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_FILE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")


def engine_dirs(path: Path, cfg) -> list[tuple[str, Path]]:
    """(parameter-name prefix, folder of DeepSpeed's files) of each optimised part of the model
    `cfg` in checkpoint tag `path`: the tag itself for a model trained whole."""
    parts = optimized_parts(cfg)
    if [p.name for p in parts] == [WHOLE_MODEL]:
        return [("", Path(path))]
    return [(f"{p.module}." if p.module else "", Path(path) / p.name) for p in parts]


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def part_file(path: Path, part: str, scope: str, rank: int) -> Path:
    """The file of one stateful part: scope "dp" (per data-parallel rank) or "rank" (global)."""
    return Path(path) / f"{part}_{scope}{rank}.pt"


def save_part(path: Path, part: str, scope: str, rank: int, state: dict) -> None:
    torch.save(state, part_file(path, part, scope, rank))


def load_part(path: Path, part: str, scope: str, rank: int) -> dict:
    """A part's state, read with weights_only=True (a planted pickle raises CheckpointError)."""
    return load_pt(part_file(path, part, scope, rank))


def part_ranks(path: Path, part: str, scope: str) -> int:
    return len(list(Path(path).glob(f"{part}_{scope}*.pt")))


def complete_tags(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if TAG.match(p.name) and (p / COMPLETE).is_file())


def find_resume(root: str | Path, resume: str | None) -> Path | None:
    """'auto' -> the checkpoint named by `latest` (None when there is none yet); a path -> itself."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise CheckpointError(
                f"checkpoint.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)"
            )
        return path
    root = Path(root)
    latest = root / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).is_file():
            return root / tag
    tags = complete_tags(root)
    return root / tags[-1] if tags else None


def tag_dir(path: Path, tag: str | None) -> Path:
    """The folder holding the rank files: path/tag, path/<latest>, or path itself."""
    if tag is not None:
        return path / tag
    if (path / LATEST).is_file() and not any(path.glob("*_model_states.pt")):
        return path / (path / LATEST).read_text().strip()
    return path


def train_config_model(path: Path) -> ModelConfig:
    """The model config a trainer run recorded in its checkpoint (train_config.yaml)."""
    file = path / TRAIN_CONFIG
    if not file.is_file():
        raise CheckpointError(
            f"{file}: missing; pass the model section explicitly (--set preset=NAME [--set FIELD=VALUE ...])"
        )
    data = yaml.safe_load(file.read_text()) or {}
    try:  # the family and preset the run trained, with its field overrides
        return resolve_model_section(data.get("model") or {})
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from None


def train_config_precision(path: Path) -> str | None:
    """The precision a trainer run trained in (parallel.precision of train_config.yaml), if recorded."""
    file = path / TRAIN_CONFIG
    data = (yaml.safe_load(file.read_text()) or {}) if file.is_file() else {}
    precision = (data.get("parallel") or {}).get("precision")
    return precision if precision in DTYPES else None


def train_config_text_format(path: Path) -> TextFormat:
    """The text format a trainer run recorded (the data.* keys of train_config.yaml); the
    release's when the file has none."""
    file = path / TRAIN_CONFIG
    data = (yaml.safe_load(file.read_text()) or {}).get("data") or {} if file.is_file() else {}
    keys = TextFormat().to_dict()
    try:
        return TextFormat.from_dict({k: data[k] for k in keys if k in data}, f"{file}: data")
    except (TextFormatError, TypeError) as err:
        raise CheckpointError(str(err)) from None

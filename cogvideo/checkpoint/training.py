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
        COMPLETE                  written after every rank finished (barrier): the digest of
                                  every other file in the tag (cogvideo/checkpoint/digest.py);
                                  empty in checkpoints written before digests were kept
    {dir}/latest                  the tag of the newest complete checkpoint
    {dir}/LOCK                    the live run writing here (host, pid, SLURM job id; cogvideo/runlock.py)

The trainer (`pretrain/checkpoint.py`) writes this layout, the ZeRO converter
(`cogvideo/checkpoint/zero.py`) reads it; both take every name from here. Every file of a part
is read with ``torch.load(weights_only=True)``: nothing in a checkpoint directory can run code.
A checkpoint is verified against its digests before it is read (the trainer's resume, the
converter, `cogvideo-convert inspect`); `--resume auto` takes the newest one that verifies.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from cogvideo.checkpoint.digest import size_problems, verify_folder
from cogvideo.checkpoint.io import CheckpointError, load_pt
from cogvideo.family import WHOLE_MODEL, optimized_parts, resolve_model_section
from cogvideo.precision import DTYPES
from cogvideo.text_format import TextFormat, TextFormatError

COMPLETE = "COMPLETE"
LATEST = "latest"
TRAIN_CONFIG = "train_config.yaml"
FULL_MODEL = "model_full.pt"
# the trainer's average of the weights (pretrain/ema.py, optim.ema_decay): a part file per global
# rank, its averages under EMA_PREFIX + parameter name, and "tp_rank" naming the shard it holds
EMA_PART, EMA_SCOPE, EMA_PREFIX = "ema", "rank", "shadow."
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


def write_complete(path: Path, record: dict) -> None:
    """Mark the checkpoint `path` complete with the digest record of its files; atomic, so a
    reader sees either no COMPLETE or all of it."""
    tmp = Path(path) / f".{COMPLETE}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(path) / COMPLETE)


def read_complete(path: Path) -> dict | None:
    """The digest record in `path`/COMPLETE; None when the marker is empty (written before
    checkpoints recorded digests). Raises CheckpointError when it cannot be read."""
    file = Path(path) / COMPLETE
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{file}: unreadable ({err.strerror or err})") from None
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
        files = record["files"]
        if not isinstance(record["algorithm"], str) or not all(
            isinstance(e["bytes"], int) and isinstance(e["digest"], str) for e in files.values()
        ):
            raise ValueError("malformed entries")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{file}: not a digest record ({type(err).__name__}: {err}); the marker is corrupted"
        ) from None
    return record


def tag_problems(path: Path) -> list[str]:
    """What is wrong with a complete checkpoint that can be seen without reading its contents:
    its COMPLETE record, every recorded file present at its recorded size, train_config.yaml."""
    try:
        record = read_complete(path)
    except CheckpointError as err:
        return [str(err)]
    problems = size_problems(path, record) if record else []
    if not problems and (Path(path) / TRAIN_CONFIG).exists():
        try:
            read_train_config(path)
        except CheckpointError as err:
            problems.append(str(err))
    return problems


def verify_tag(path: Path) -> list[str]:
    """Every problem of a complete checkpoint, its files' contents against their digests
    included, in one process (the converter, inspect). [] when it verifies (or predates digests)."""
    problems = tag_problems(path)
    record = None if problems else read_complete(path)
    return problems or (verify_folder(path, record) if record else [])


def read_latest(root: Path) -> str | None:
    """The tag `root`/latest names (None without the file): ours (stepNNNNNNNN) or any DeepSpeed
    tag (global_stepN); CheckpointError when the file names no folder (binary, several lines)."""
    file = Path(root) / LATEST
    if not file.is_file():
        return None
    try:
        raw = file.read_bytes().strip()
    except OSError as err:
        raise CheckpointError(f"{file}: unreadable ({err.strerror or err})") from None
    try:  # strictly: replaced undecodable bytes would read as printable characters
        tag = raw.decode("utf-8")
    except UnicodeDecodeError:
        tag = ""
    if not tag or not tag.isprintable() or "/" in tag or tag in (".", ".."):
        raise CheckpointError(f"{file}: does not name a checkpoint folder (found {raw[:40]!r})")
    return tag


def resume_candidates(
    root: str | Path, resume: str | None, check: Callable[[Path], None] | None = None
) -> tuple[list[Path], list[str]]:
    """The checkpoints `resume` may start from, best first, and notes for the log.

    A path: itself, if complete and whole (CheckpointError naming the file otherwise). 'auto':
    every complete checkpoint in `root` that is whole, newest first; one that is not is skipped
    with a note saying why; none at all: [] and a note; some but none whole: CheckpointError.
    `check(path)` adds the caller's own checks (CheckpointError: not whole). Whole means what
    `tag_problems` sees; the contents are verified against their digests by the caller, which
    then falls back along the list."""
    if resume is None:
        return [], []
    if resume != "auto":
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise CheckpointError(
                f"checkpoint.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)"
            )
        problems = _problems(path, check)
        if problems:
            raise CheckpointError(f"checkpoint.resume: {summarize(problems)}")
        return [path], []
    root, notes, found = Path(root), [], []
    try:
        read_latest(root)
    except CheckpointError as err:
        notes.append(f"{err} (ignored: the newest complete checkpoint is taken)")
    tags = complete_tags(root)[::-1]
    if not tags:
        return [], notes + [f"--resume auto: no complete checkpoint in {root}; starting from step 0"]
    skipped = []
    for tag in tags:
        problems = _problems(root / tag, check)
        if problems:
            skipped.append(f"{root / tag}: {summarize(problems)}")
        else:
            found.append(root / tag)
    notes += [f"--resume auto: skipping {line}" for line in skipped]
    if not found:
        raise CheckpointError(
            f"--resume auto: no checkpoint in {root} is whole ({'; '.join(skipped)}); restore the "
            f"files, move the damaged checkpoints away, or use another checkpoint.dir"
        )
    return found, notes


def _problems(path: Path, check: Callable[[Path], None] | None) -> list[str]:
    problems = tag_problems(path)
    if not problems and check is not None:
        try:
            check(path)
        except CheckpointError as err:
            problems.append(str(err))
    return problems


def summarize(problems: list[str]) -> str:
    """The first problem, and how many more there are."""
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def tag_dir(path: Path, tag: str | None) -> Path:
    """The folder holding the rank files: path/tag, path/<latest>, or path itself."""
    if tag is not None:
        return path / tag
    if (path / LATEST).is_file() and not any(path.glob("*_model_states.pt")):
        return path / read_latest(path)
    return path


def read_train_config(path: Path) -> dict:
    """train_config.yaml of a checkpoint as a mapping ({} when absent); CheckpointError when it
    cannot be read."""
    file = Path(path) / TRAIN_CONFIG
    if not file.is_file():
        return {}
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{file}: unreadable ({first})") from None
    if data is not None and not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a mapping of config sections, found {type(data).__name__}")
    return data or {}


def train_config_model(path: Path):
    """The model config (its family's) a trainer run recorded in its checkpoint (train_config.yaml)."""
    file = path / TRAIN_CONFIG
    if not file.is_file():
        raise CheckpointError(
            f"{file}: missing; pass the model section explicitly (--set preset=NAME [--set FIELD=VALUE ...])"
        )
    data = read_train_config(path)
    try:  # the family and preset the run trained, with its field overrides
        return resolve_model_section(data.get("model") or {})
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from None


def train_config_precision(path: Path) -> tuple[str | None, str]:
    """(precision, attention precision) a trainer run trained in (parallel.precision and
    parallel.attention_precision of train_config.yaml): the precision None where not recorded,
    the attention "same" (as runs trained before it was chosen)."""
    recorded = read_train_config(path).get("parallel") or {}
    precision, attention = recorded.get("precision"), recorded.get("attention_precision")
    return (precision if precision in DTYPES else None), ("fp32" if attention == "fp32" else "same")


def train_config_zero_stage(path: Path) -> int | None:
    """The ZeRO stage a trainer run's DeepSpeed files were written at (parallel.zero_stage of
    train_config.yaml, as the run resolved it); None where not recorded."""
    stage = (read_train_config(path).get("parallel") or {}).get("zero_stage")
    return stage if isinstance(stage, int) and not isinstance(stage, bool) else None


def train_config_text_format(path: Path) -> TextFormat:
    """The text format a trainer run recorded (the data.* keys of train_config.yaml); the
    release's when the file has none."""
    file = path / TRAIN_CONFIG
    data = read_train_config(path).get("data") or {}
    keys = TextFormat().to_dict()
    try:
        return TextFormat.from_dict({k: data[k] for k in keys if k in data}, f"{file}: data")
    except (TextFormatError, TypeError) as err:
        raise CheckpointError(str(err)) from None


def ema_shards(path: Path, tp: int) -> list[dict] | None:
    """The weight averages of the TP shards (global ranks 0..tp-1: data-parallel rank 0 under
    megatron's rank order) in checkpoint tag `path`, memory-mapped; None without an average."""
    if not part_file(path, EMA_PART, EMA_SCOPE, 0).is_file():
        return None
    shards = [load_pt(part_file(path, EMA_PART, EMA_SCOPE, r), mmap=True) for r in range(tp)]
    for r, shard in enumerate(shards):
        if shard.get("tp_rank", 0) != r:
            raise CheckpointError(
                f"{part_file(path, EMA_PART, EMA_SCOPE, r)}: holds TP rank {shard.get('tp_rank')}'s average, "
                f"expected {r}'s (ranks ordered TP-first, as megatron-core orders them)"
            )
    return shards

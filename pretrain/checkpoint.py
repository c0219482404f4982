"""Training checkpoints: DeepSpeed's model/optimizer state plus every other stateful part.

The layout (file names, `COMPLETE`, `latest`, `LOCK`) belongs to `cogvideo.checkpoint.training`.
Besides the DeepSpeed engine, each stateful part (an object with ``state_dict`` /
``load_state_dict``: the data loader, the RNG states) is saved per data-parallel rank or per
global rank, and read back with ``weights_only=True``.

A process killed while writing leaves a tag without COMPLETE and `latest` untouched, so the
previous checkpoint stays the one `--resume auto` picks. Only the last K complete ones are kept.
COMPLETE records the digest of every file in the tag (`cogvideo.checkpoint.digest`), computed by
all ranks, each over its share of the files; before resuming, all ranks verify them the same way.
"""

from __future__ import annotations

import errno
import logging
import random
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from cogvideo import parallel
from cogvideo.checkpoint.digest import content_problems, deal, digests, folder_files, make_record
from cogvideo.checkpoint.io import CheckpointError, unreadable
from cogvideo.checkpoint.training import (
    COMPLETE,
    FULL_MODEL,
    LATEST,
    TAG,
    TRAIN_CONFIG,
    complete_tags,
    engine_dirs,
    load_part,
    part_file,
    part_ranks,
    read_complete,
    save_part,
    summarize,
    tag_for,
    train_config_precision,
    train_config_zero_stage,
    write_complete,
)
from cogvideo.configio import save_yaml
from cogvideo.family import family_of
from cogvideo.runlock import atomic_write
from pretrain.config import ParallelConfig, resolved_zero_stage
from pretrain.engines import Engines

log = logging.getLogger(__name__)

PARTS = {"loader": "dp", "rng": "rank"}  # the trainer's stateful parts beside the engine, and their scope


class FoundByAllRanks(CheckpointError):
    """A problem every rank found alike (rank 0 reports it)."""


class UnverifiedCheckpoint(FoundByAllRanks):
    """The checkpoint to resume does not match its digests."""


class SaveFailed(FoundByAllRanks):
    """A write of the checkpoint failed on some rank (a full disk); the partial tag is removed."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RNGState:
    """The Python, NumPy and torch generators of this process and its model-parallel RNG states
    (attention dropout under TP, `cogvideo.parallel`) as tensors and numbers, so that the file
    loads with weights_only=True."""

    def state_dict(self) -> dict:
        version, words, gauss = random.getstate()
        numpy = np.random.get_state(legacy=False)
        state = {
            "python_version": version,
            "python": torch.tensor(words, dtype=torch.int64),
            "python_gauss": gauss,
            "numpy_key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            "numpy_pos": int(numpy["state"]["pos"]),
            "numpy_has_gauss": int(numpy["has_gauss"]),
            "numpy_gauss": float(numpy["gauss"]),
            "torch": torch.get_rng_state(),
            "model_parallel": parallel.model_parallel_rng_states(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
        np.random.set_state(
            {
                "bit_generator": "MT19937",
                "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
                "has_gauss": state["numpy_has_gauss"],
                "gauss": state["numpy_gauss"],
            }
        )
        torch.set_rng_state(state["torch"])
        if "model_parallel" in state:  # absent from checkpoints written before it was kept
            parallel.set_model_parallel_rng_states(state["model_parallel"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def check_pickled_globals(path: Path) -> None:
    """Before loading: a DeepSpeed rank file may name no global beyond DEEPSPEED_GLOBALS (reads
    only the pickle, not the tensors)."""
    try:
        extra = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - DEEPSPEED_GLOBALS
    except Exception as err:
        raise CheckpointError(f"{path}: not a torch checkpoint ({type(err).__name__}: {err})") from err
    if extra:
        raise CheckpointError(
            f"{path}: refers to {sorted(extra)}, which a checkpoint never holds; "
            f"it is not loaded (replace the file or resume from another checkpoint)"
        )


def check_zero_stage(path: Path, dp_size: int, parallel_cfg: ParallelConfig) -> None:
    """The ZeRO stage checkpoint `path` was written at is the one a run of `dp_size` DP ranks
    with `parallel_cfg` resumes at (its precision, if auto, the one the checkpoint trained in)."""
    written_at, (trained_in, _) = train_config_zero_stage(path), train_config_precision(path)
    precision = trained_in if parallel_cfg.precision == "auto" else parallel_cfg.precision
    if written_at is None or precision is None:  # not recorded: DeepSpeed's load decides
        return
    stage = resolved_zero_stage(parallel_cfg, dp_size, precision)
    if stage != written_at:
        raise CheckpointError(
            f"{path}: written at ZeRO-{written_at}, this run would resume at ZeRO-{stage}; DeepSpeed's files "
            f"differ between stages: resume with parallel.zero_stage={written_at}, or convert the checkpoint "
            "(cogvideo-convert zero) and start from it (init.weights, init.optimizer=true)"
        )


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine, loading with torch.load(weights_only=True): its files hold
    tensors, plain values and the four plain-data DeepSpeed classes of DEEPSPEED_GLOBALS; any
    other object in a file is refused instead of run. A write that fails (a full disk) is kept in
    `failed` instead of raised, so that this rank reaches DeepSpeed's barriers like the others and
    all ranks stop together (`CheckpointManager.save`)."""

    def __init__(self, engine):
        self.engine = engine
        self.failed: list[tuple[str, BaseException]] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def save(self, state_dict, path: str) -> None:
        attempt(self.failed, path, self.engine.save, state_dict, path)

    def makedirs(self, path, exist_ok=False) -> None:
        attempt(self.failed, path, self.engine.makedirs, path, exist_ok=exist_ok)

    def load(self, path: str, map_location=None):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # the unpickler's refusal, a truncated file: the same to the caller
            raise unreadable(path, err) from None


def attempt(failed: list, path, write, *args, **kwargs) -> None:
    """Run one write of a checkpoint; a failure (OSError, or torch's RuntimeError from its zip
    writer: "file write failed", "unexpected pos") is appended to `failed`, not raised."""
    try:
        write(*args, **kwargs)
    except (OSError, RuntimeError) as err:
        failed.append((str(path), err))


def safe_engine(engine) -> SafeCheckpointEngine:
    if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
    return engine.checkpoint_engine


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) `path`."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def estimated_bytes(total_params: int, trainable_params: int, precision: str, export_full: bool) -> int:
    """One checkpoint on disk: the module's weights in the training precision, DeepSpeed's fp32
    master weights and Adam moments (12 bytes per trainable parameter, over all ranks), the merged
    fp32 copy if exported."""
    weight_bytes = 4 if precision in ("fp32", "auto") else 2
    return total_params * weight_bytes + 12 * trainable_params + (4 * total_params if export_full else 0)


def full_state_dict(engines: Engines, model_cfg) -> dict | None:
    """The merged (all TP ranks, ZeRO-3 gathered) fp32 model state on global rank 0, else None:
    every optimised part's module under its name in the model."""
    full: dict = {}
    for part in engines.parts:
        prefix = f"{part.module}." if part.module else ""
        state = _part_state_dict(engines.by_part[part.name], model_cfg, prefix)
        if state is not None:
            full.update(state)
    return full if dist.get_rank() == 0 else None


def _part_state_dict(engine, model_cfg, prefix: str) -> dict | None:
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        local = {
            prefix + k: v.detach().float().cpu().clone()
            for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor)
        }  # megatron layers add `_extra_state` entries
    if parallel.tp_size() == 1:
        return local if dist.get_rank() == 0 else None
    gathered = [None] * parallel.tp_size() if parallel.tp_rank() == 0 else None
    if parallel.dp_rank() == 0:
        dist.gather_object(
            local, gathered, dst=dist.get_global_rank(parallel.tp_group(), 0), group=parallel.tp_group()
        )
    plan = family_of(model_cfg).tp_plan
    return plan.merge_state_dicts(gathered) if dist.get_rank() == 0 else None


def _engine_folders(engines: Engines, path: Path):
    """(folder, tag, engine) of each engine as DeepSpeed saves it (DeepSpeed writes folder/tag):
    the layout's `engine_dirs` (the checkpoint tag itself for a whole-model run, else one folder
    per optimised part)."""
    dirs = engine_dirs(path, engines.model_cfg)
    return [(d.parent, d.name, engines.by_part[part.name]) for (_, d), part in zip(dirs, engines.parts)]


class CheckpointManager:
    """Saves and restores the engine and the stateful `parts`: {name: (object, scope)}, scope
    "dp" (one file per data-parallel rank, written by TP rank 0) or "rank" (one per global rank)."""

    def __init__(
        self,
        root: str | Path,
        keep_last: int,
        export_full: bool = False,
        parts: dict[str, tuple[Stateful, str]] | None = None,
        expected_bytes: int = 0,
        model_cfg=None,  # the model's config (export_full merges its shards by the family's plan)
    ):
        self.root = Path(root)
        self.expected_bytes = expected_bytes  # one checkpoint, estimated (`estimated_bytes`)
        self.keep_last = keep_last
        self.export_full = export_full
        self.parts = parts or {}
        self.model_cfg = model_cfg

    def save(self, engines: Engines, step: int, config) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory. A write that fails
        on any rank raises SaveFailed on every rank, after the partial checkpoint is removed."""
        tag = tag_for(step)
        path = self.root / tag
        rank, failed = dist.get_rank(), []
        for engine in engines.by_part.values():
            safe_engine(engine).failed = failed  # every engine's failed writes in one list
        if rank == 0:  # saving again into a tag (after a fallback): not complete until done
            attempt(failed, path / COMPLETE, (path / COMPLETE).unlink, missing_ok=True)
        for folder, name, engine in _engine_folders(engines, path):
            engine.save_checkpoint(str(folder), tag=name, client_state={"step": step}, save_latest=False)
        self._save_parts(path, failed)
        full = full_state_dict(engines, self.model_cfg) if self.export_full else None
        if rank == 0:
            attempt(failed, path / TRAIN_CONFIG, save_yaml, config, path / TRAIN_CONFIG)
            if full is not None:
                attempt(failed, path / FULL_MODEL, torch.save, full, path / FULL_MODEL)
        self._all_written(failed, path, step)
        record = self._digest_record(path)
        if rank == 0:
            attempt(failed, path / COMPLETE, self._mark_complete, path, record)
            if not failed:
                self._prune()
        self._all_written(failed, path, step)
        return path

    def _save_parts(self, path: Path, failed: list) -> None:
        """This rank's files of the stateful parts: "rank" parts on every rank, "dp" parts on TP rank 0."""
        for name, (part, scope) in self.parts.items():
            if scope == "rank" or parallel.tp_rank() == 0:
                r = dist.get_rank() if scope == "rank" else parallel.dp_rank()
                state = part.state_dict()
                attempt(failed, part_file(path, name, scope, r), save_part, path, name, scope, r, state)

    def checkpoint_bytes(self) -> int:
        """The size of one checkpoint: the newest complete one's recorded bytes, else the estimate."""
        tags = complete_tags(self.root)
        try:
            recorded = read_complete(self.root / tags[-1]) if tags else None
        except CheckpointError:
            recorded = None
        return sum(e["bytes"] for e in recorded["files"].values()) if recorded else self.expected_bytes

    def _all_written(self, failed: list, path: Path, step: int) -> None:
        """Collective (it stands for a barrier): raise SaveFailed on every rank if a write failed on any."""
        found = [None] * dist.get_world_size()
        dist.all_gather_object(
            found, [(file, type(err).__name__, str(err), getattr(err, "errno", None)) for file, err in failed]
        )
        failures = [f for part in found for f in part]
        if not failures:
            return
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)  # gives the space back; the tag never was complete
        dist.barrier()
        raise SaveFailed(self._failure(failures[0], step))

    def _failure(self, failure: tuple, step: int) -> str:
        """One line: the directory, the file that failed, the bytes a checkpoint needs and are free."""
        file, kind, text, errno_ = failure
        free, need = free_bytes(self.root), self.checkpoint_bytes()
        tags = complete_tags(self.root)
        intact = (
            f"the previous checkpoint {self.root / tags[-1]} is intact"
            if tags
            else "no earlier checkpoint exists"
        )
        where = f"saving step {step} into checkpoint.dir {self.root}"
        if errno_ == errno.ENOSPC or free < need:
            return (
                f"{where}: no space left on device (writing {file}): a checkpoint takes about {need:,} "
                f"bytes, {free:,} are free; {intact}; free space there (or lower checkpoint.keep_last)"
            )
        return f"{where} failed writing {file} ({kind}: {text.splitlines()[0] if text else ''}); {intact}"

    def _digest_record(self, path: Path) -> dict | None:
        """Collective: the digests of every file in `path`, each rank hashing its share (rank 0
        lists the folder for all); the record on rank 0, None elsewhere."""
        listing = [folder_files(path, exclude=(COMPLETE,)) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(listing, src=0)
        share = deal(listing[0], dist.get_world_size())[dist.get_rank()]
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(digests(path, share), gathered, dst=0)
        if gathered is None:
            return None
        return make_record({name: entry for part in gathered for name, entry in part.items()})

    def _mark_complete(self, path: Path, record: dict) -> None:
        write_complete(path, record)
        atomic_write(self.root / LATEST, path.name)

    def verified(self, candidates: list[Path], explicit: bool) -> Path | None:
        """Collective, before any rank loads: the first of `candidates` whose files all match the
        digests recorded when it was completed, each rank checking its share. An explicit
        checkpoint that does not verify raises; under `--resume auto` the next is tried, rank 0
        saying which was skipped and why. None when there are no candidates."""
        for path in candidates:
            problems = self._content_problems(path)
            if not problems:
                return path
            if explicit:
                raise UnverifiedCheckpoint(f"checkpoint.resume: {summarize(problems)}")
            if dist.get_rank() == 0:
                log.warning("--resume auto: skipping %s: %s", path, summarize(problems))
        if candidates:
            raise UnverifiedCheckpoint(
                f"--resume auto: no checkpoint in {self.root} verifies (each is named above); restore "
                f"the files, move the damaged checkpoints away, or use another checkpoint.dir"
            )
        return None

    def _content_problems(self, path: Path) -> list[str]:
        record = read_complete(path)
        if record is None:
            if dist.get_rank() == 0:
                log.warning("%s was written before checkpoints recorded digests: resumed unverified", path)
            return []
        sizes = {name: entry["bytes"] for name, entry in record["files"].items()}
        mine = content_problems(path, record, deal(sizes, dist.get_world_size())[dist.get_rank()])
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, mine)
        return sorted(line for part in found for line in part)

    def _prune(self) -> None:
        """Keep the last K complete checkpoints; drop older ones and abandoned partial writes."""
        keep = complete_tags(self.root)[-self.keep_last :]
        for p in self.root.iterdir():
            if TAG.match(p.name) and p.name not in keep and p.name < keep[-1]:
                shutil.rmtree(p, ignore_errors=True)

    def check(self, path: Path, dp_size: int, parallel_cfg: ParallelConfig | None = None) -> None:
        """Before any process group: every part's files are there and load safely, DeepSpeed's
        rank files name no foreign object, and (given the run's `parallel_cfg`) they were written
        at the ZeRO stage this run resumes at (a resumed `auto` precision is the one trained in)."""
        for file in sorted(path.rglob("*_states.pt")):  # the tag's, or one folder per optimised part
            check_pickled_globals(file)
        if parallel_cfg is not None:
            check_zero_stage(path, dp_size, parallel_cfg)
        for name, (_, scope) in self.parts.items():
            written = part_ranks(path, name, scope)
            if scope == "dp" and written != dp_size:
                raise CheckpointError(
                    f"{path}: {name} written by {written} data-parallel ranks, resumed with "
                    f"{dp_size}; {name} state is per DP rank, so resume with the same DP size"
                )
            for r in range(written):
                load_part(path, name, scope, r)

    def load(self, engines: Engines, path: Path) -> int:
        """Collective. Restores every engine (model, optimizer, schedule) and every part; returns the step."""
        for folder, name, engine in _engine_folders(engines, path):
            safe_engine(engine)
            if not (folder / name).is_dir():
                raise CheckpointError(f"{folder / name}: missing (the optimised part {name!r} of this model)")
            loaded, client = engine.load_checkpoint(str(folder), tag=name)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load the checkpoint {folder / name}")
        for name, (part, scope) in self.parts.items():
            rank = dist.get_rank() if scope == "rank" else parallel.dp_rank()
            if part_file(path, name, scope, rank).is_file():
                part.load_state_dict(load_part(path, name, scope, rank))
            elif scope == "dp":
                raise CheckpointError(f"{part_file(path, name, scope, rank)}: missing")
            else:
                log.warning("%s missing: %s starts fresh", part_file(path, name, scope, rank), name)
        return int(client["step"])

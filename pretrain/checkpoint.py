"""Training checkpoints: DeepSpeed's model/optimizer state plus every other stateful part.

The layout (file names, `COMPLETE`, `latest`, `LOCK`) belongs to `cogvideo.checkpoint.training`.
Besides the DeepSpeed engine, each stateful part (an object with ``state_dict`` /
``load_state_dict``: the data loader, the RNG states) is saved per data-parallel rank or per
global rank, and read back with ``weights_only=True``.

A process killed while writing leaves a tag without COMPLETE and `latest` untouched, so the
previous checkpoint stays the one `--resume auto` picks. Only the last K complete ones are kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from cogvideo import parallel
from cogvideo.checkpoint.io import CheckpointError, unreadable
from cogvideo.checkpoint.training import (
    COMPLETE,
    FULL_MODEL,
    LATEST,
    LOCK,
    TAG,
    TRAIN_CONFIG,
    complete_tags,
    engine_dirs,
    load_part,
    part_file,
    part_ranks,
    save_part,
    tag_for,
)
from cogvideo.configio import save_yaml
from cogvideo.family import family_of
from pretrain.engines import Engines

log = logging.getLogger(__name__)


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


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine, loading with torch.load(weights_only=True): its files hold
    tensors, plain values and the four plain-data DeepSpeed classes of DEEPSPEED_GLOBALS; any
    other object in a file is refused instead of run."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

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


class CheckpointManager:
    """Saves and restores the engine and the stateful `parts`: {name: (object, scope)}, scope
    "dp" (one file per data-parallel rank, written by TP rank 0) or "rank" (one per global rank)."""

    def __init__(
        self,
        root: str | Path,
        keep_last: int,
        export_full: bool = False,
        parts: dict[str, tuple[Stateful, str]] | None = None,
        model_cfg=None,  # the model's config (export_full merges its shards by the family's plan)
    ):
        self.root = Path(root)
        self.keep_last = keep_last
        self.export_full = export_full
        self.parts = parts or {}
        self.model_cfg = model_cfg

    def save(self, engines: Engines, step: int, config) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        tag = tag_for(step)
        path = self.root / tag
        for folder, name, engine in _engine_folders(engines, path):
            engine.save_checkpoint(str(folder), tag=name, client_state={"step": step}, save_latest=False)
        rank = dist.get_rank()
        for name, (part, scope) in self.parts.items():
            if scope == "rank":
                save_part(path, name, scope, rank, part.state_dict())
            elif parallel.tp_rank() == 0:
                save_part(path, name, scope, parallel.dp_rank(), part.state_dict())
        full = full_state_dict(engines, self.model_cfg) if self.export_full else None
        if rank == 0:
            save_yaml(config, path / TRAIN_CONFIG)
            if full is not None:
                torch.save(full, path / FULL_MODEL)
        dist.barrier()
        if rank == 0:
            self._mark_complete(path)
            self._prune()
        dist.barrier()
        return path

    def _mark_complete(self, path: Path) -> None:
        (path / COMPLETE).write_text("")
        _atomic_write(self.root / LATEST, path.name)

    def _prune(self) -> None:
        """Keep the last K complete checkpoints; drop older ones and abandoned partial writes."""
        keep = complete_tags(self.root)[-self.keep_last :]
        for p in self.root.iterdir():
            if TAG.match(p.name) and p.name not in keep and p.name < keep[-1]:
                shutil.rmtree(p, ignore_errors=True)

    def check(self, path: Path, dp_size: int) -> None:
        """Before any process group: every part's files are there and load safely, and DeepSpeed's
        rank files name no foreign object."""
        for file in sorted(path.rglob("*_states.pt")):  # the tag's, or one folder per optimised part
            check_pickled_globals(file)
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
            if not isinstance(engine.checkpoint_engine, WeightsOnlyLoads):
                engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
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


def _engine_folders(engines: Engines, path: Path):
    """(folder, tag, engine) of each engine as DeepSpeed saves it (DeepSpeed writes folder/tag):
    the layout's `engine_dirs` (the checkpoint tag itself for a whole-model run, else one folder
    per optimised part)."""
    dirs = engine_dirs(path, engines.model_cfg)
    return [(d.parent, d.name, engines.by_part[part.name]) for (_, d), part in zip(dirs, engines.parts)]


class RunLock:
    """{dir}/LOCK names the live run writing a checkpoint directory (host, pid, SLURM job id).
    A lock whose process is gone (same host) or that a requeued SLURM job left behind is stale
    and taken over; any other lock refuses the run."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / LOCK
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "pid_start": _process_start(os.getpid()),
        }

    def acquire(self) -> str | None:
        """Take the lock; returns a message when a stale lock was taken over. Raises CheckpointError."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "x") as f:
                json.dump(self.me, f)
            return None
        except FileExistsError:
            pass
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = {}  # half written by a run killed while taking it
        stale = self._stale(holder)
        if stale is None:
            raise CheckpointError(
                f"checkpoint.dir {self.path.parent}: a live run holds it ({self.path}: host "
                f"{holder.get('host')}, pid {holder.get('pid')}, SLURM job {holder.get('slurm_job_id')}, "
                f"since {holder.get('started')}); "
                f"stop that run or use another checkpoint.dir (delete {self.path} only if no run uses it)"
            )
        _atomic_write(self.path, json.dumps(self.me))
        return f"taking over the stale lock {self.path} ({stale})"

    def _stale(self, holder: dict) -> str | None:
        """Why the holder is gone, or None when it may be alive."""
        if not holder:
            return "unreadable"
        job = holder.get("slurm_job_id")
        if job and job == self.me["slurm_job_id"]:
            return f"left by SLURM job {job}, requeued"
        if holder.get("host") != self.me["host"]:
            return None
        pid = int(holder.get("pid", -1))
        if _process_start(pid) is None:
            return f"pid {pid} on {holder['host']} is no longer running"
        if holder.get("pid_start") is not None and _process_start(pid) != holder["pid_start"]:
            return f"pid {pid} on {holder['host']} is now another process"
        return None

    def release(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("host") == self.me["host"] and holder.get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)


def _process_start(pid: int) -> int | None:
    """The start time of a live process (clock ticks since boot, from /proc), 0 where /proc
    is absent; None when no such process exists."""
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)

"""Training checkpoints: DeepSpeed's model/optimizer state plus what exact resumption needs.

    {dir}/step00000400/           one checkpoint ("tag")
        mp_rank_XX_model_states.pt, *optim_states.pt   DeepSpeed (all ranks write)
        loader_dp{r}.json         loader position of data-parallel rank r
        rng_rank{r}.pt            RNG states of global rank r
        train_config.yaml         the resolved training config
        COMPLETE                  written after every rank finished (barrier)
    {dir}/latest                  the tag of the newest complete checkpoint

A process killed while writing leaves a tag without COMPLETE and `latest` untouched, so the
previous checkpoint stays the one `--resume auto` picks. Only the last K complete ones are kept.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cogvideo import parallel
from cogvideo.configio import save_yaml
from pretrain.data import LoaderPosition

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_tags(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).is_file())


def find_resume(root: str | Path, resume: str | None) -> Path | None:
    """'auto' -> the checkpoint named by `latest` (None when there is none yet); a path -> itself."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)")
        return path
    root = Path(root)
    latest = root / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).is_file():
            return root / tag
        log.warning("%s names %s, which is incomplete; using the newest complete checkpoint", latest, tag)
    tags = complete_tags(root)
    return root / tags[-1] if tags else None


def full_state_dict(engine) -> dict | None:
    """The merged (all TP ranks, ZeRO-3 gathered) fp32 model state on global rank 0, else None."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        local = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()
                 if isinstance(v, torch.Tensor)}  # megatron layers add `_extra_state` entries
    if parallel.tp_size() == 1:
        return local if dist.get_rank() == 0 else None
    gathered = [None] * parallel.tp_size() if parallel.tp_rank() == 0 else None
    if parallel.dp_rank() == 0:
        dist.gather_object(local, gathered, dst=dist.get_global_rank(parallel.tp_group(), 0),
                           group=parallel.tp_group())
    return parallel.merge_state_dicts(gathered) if dist.get_rank() == 0 else None


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, export_full: bool = False):
        self.root = Path(root)
        self.keep_last = keep_last
        self.export_full = export_full

    def save(self, engine, step: int, position: LoaderPosition, config) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        tag = tag_for(step)
        path = self.root / tag
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
        rank = dist.get_rank()
        if parallel.tp_rank() == 0:
            _atomic_write(path / f"loader_dp{parallel.dp_rank()}.json", json.dumps(position.to_dict()))
        torch.save(rng_state(), path / f"rng_rank{rank}.pt")
        full = full_state_dict(engine) if self.export_full else None
        if rank == 0:
            save_yaml(config, path / "train_config.yaml")
            if full is not None:
                torch.save(full, path / "model_full.pt")
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
        keep = complete_tags(self.root)[-self.keep_last:]
        for p in self.root.iterdir():
            if _TAG.match(p.name) and p.name not in keep and p.name < keep[-1]:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, path: Path) -> tuple[int, LoaderPosition]:
        """Collective. Restores model, optimizer, schedule and RNG; returns (step, loader position)."""
        loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        written = len(list(path.glob("loader_dp*.json")))
        if written != parallel.dp_size():
            raise RuntimeError(f"{path}: written by {written} data-parallel ranks, resumed with {parallel.dp_size()}; "
                               f"loader positions are per DP rank, so resume with the same DP size")
        loader_file = path / f"loader_dp{parallel.dp_rank()}.json"
        position = LoaderPosition.from_dict(json.loads(loader_file.read_text()))
        rng_file = path / f"rng_rank{dist.get_rank()}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("%s missing: RNG states start fresh", rng_file)
        return int(client["step"]), position


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)

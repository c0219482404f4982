"""Sampling many prompts: locally (optionally under torchrun for TP/DP) or on Ray actors that
each load the models once and pull batches of prompts.

The output folder holds one entry per prompt (`<key>/`, see `outputs.py`), each finished by
its record.json; a rerun skips entries recorded as ok. A prompt that fails is recorded with
its error and the others go on. manifest.json and contact_sheet.png cover every prompt.

`dtype: auto` (and `attention_precision: auto`) is resolved once per job, before any worker loads
a model: the precision a run of this job already recorded in options.json, else the pipeline's
own choice (timed). Every worker, actor and resumed run then samples in that one precision, so a
seed gives one video.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Protocol

from cogvideo.configio import to_dict
from cogvideo.runlock import RunLock
from cogvideo.sampling.outputs import write_contact_sheet, write_json, write_video_entry
from cogvideo.sampling.prompts import Prompt

log = logging.getLogger(__name__)
RECORD = "record.json"
# options that change how the work is spread, not what is sampled: may differ on a rerun
SCHEDULING_OPTIONS = ("workers", "batch_size")


class JobOptions(Protocol):
    """What the job reads of a family's sampling options (a dataclass: its record is
    `to_dict(options)`); the rest is the family pipeline's."""

    workers: int
    batch_size: int
    device: str
    tensor_parallel: int


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set by torchrun on every rank


def read_record(out: Path, key: str) -> dict | None:
    path = out / key / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _failed(prompt: Prompt, err: BaseException) -> dict:
    return {
        "key": prompt.key,
        "prompt": prompt.text,
        "status": "failed",
        "error": f"{type(err).__name__}: {err}",
    }


class Progress:
    """One console line per finished prompt: `[3/40] key: ok, 17 frames, 2.1 s` or its error."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __call__(self, records: list[dict]) -> None:
        for record in records:
            self.done += 1
            where = f"[{self.done}/{self.total}] {record['key']}"
            if record["status"] == "ok":
                log.info("%s: ok, %d frames, %.1f s", where, record["frames"], record["seconds"])
            else:
                log.warning("%s: failed: %s", where, record["error"])
            for note in record.get("notes", []):
                log.warning("%s: %s", where, note)


def sample_batch(
    pipeline, batch: list[Prompt], out: Path, write: bool = True, worker: str = "local"
) -> list[dict]:
    """Sample one batch and write its entries; a failing prompt never takes the others down."""
    records, notes = {}, {}
    ready = []
    for prompt in batch:
        try:
            notes[prompt.key] = pipeline.check(prompt)
            ready.append(prompt)
        except Exception as err:
            records[prompt.key] = _failed(prompt, err)
    groups = [ready] if ready else []
    while groups:
        group = groups.pop()
        start = time.perf_counter()
        try:
            videos = pipeline.sample(group)
        except Exception as err:
            if len(group) > 1:  # find the culprit: retry one prompt at a time
                groups.extend([p] for p in group)
                continue
            log.exception("prompt %s failed", group[0].key)  # past the checks: a bug, keep its traceback
            records[group[0].key] = _failed(group[0], err)
            continue
        seconds = (time.perf_counter() - start) / len(group)
        for prompt, (codes, frames, *more) in zip(group, videos):
            extra = more[0] if more else {}
            files = write_video_entry(out / prompt.key, codes, frames, pipeline.fps(), extra) if write else {}
            records[prompt.key] = {
                "key": prompt.key,
                "prompt": prompt.text,
                "status": "ok",
                "files": files,
                "frames": int(len(frames)),
                "fps": pipeline.fps(),
                "seconds": round(seconds, 3),
                "worker": worker,
                "notes": notes[prompt.key],
            }
    if write:
        for prompt in batch:
            (out / prompt.key).mkdir(parents=True, exist_ok=True)
            write_json(out / prompt.key / RECORD, records[prompt.key])
    return [records[p.key] for p in batch]


def recorded_options(out: str | Path) -> dict | None:
    """The options a sampling job in `out` ran with (`dtype` as it was resolved), or None."""
    path = Path(out) / "options.json"
    return json.loads(path.read_text()) if path.is_file() else None


SETTLED_KEYS = ("dtype", "attention_precision")  # what `auto` may leave to the job's choice


def settled_keys(recorded: dict) -> dict:
    """The precision keys of a job's recorded options (`recorded_options`), as it resolved them."""
    return {key: recorded[key] for key in SETTLED_KEYS if key in recorded}


def settle_precision(out: Path, options, precision: Callable | None):
    """`options` with `dtype: auto` and `attention_precision: auto` (a family that has the key)
    replaced by the job's choice: the one `out` recorded, else `precision(options)` (a
    PrecisionChoice; collective under torch.distributed). Attention settles as `fp32` or `same`."""
    unsettled = [key for key in SETTLED_KEYS if getattr(options, key, None) == "auto"]
    if not unsettled or precision is None:
        return options
    recorded = recorded_options(out) or {}
    if all(recorded.get(key, "auto") != "auto" for key in unsettled):
        settled = {key: recorded[key] for key in unsettled}
        log.info("%s, as this job's earlier run resolved it (%s/options.json)", settled, out)
        return dataclasses.replace(options, **settled)
    choice = precision(options)
    log.info(choice.describe())
    settled = {"dtype": choice.precision, "attention_precision": choice.attention_setting}
    return dataclasses.replace(options, **{key: settled[key] for key in unsettled})


def _check_options(out: Path, options: JobOptions) -> None:
    record = {k: v for k, v in to_dict(options).items() if k not in SCHEDULING_OPTIONS}
    previous = recorded_options(out)
    if previous is not None:
        previous = {k: v for k, v in previous.items() if k not in SCHEDULING_OPTIONS}
        if previous != record:
            changed = sorted(k for k in set(record) | set(previous) if record.get(k) != previous.get(k))
            raise ValueError(
                f"{out} holds a run with other options ({', '.join(changed)}): "
                f"use a new --out, or the same options to resume"
            )
    if _is_main_process():
        write_json(out / "options.json", to_dict(options))


def _run_local(batches, out: Path, make_pipeline, progress: Progress) -> None:
    from cogvideo import parallel

    pipeline = make_pipeline()
    dp, rank = parallel.dp_size(), parallel.dp_rank()
    writer = parallel.tp_rank() == 0
    if dp > 1:
        progress.total = sum(len(b) for b in batches[rank::dp])
    for batch in batches[rank::dp]:  # under torchrun each data-parallel group takes its share
        records = sample_batch(pipeline, batch, out, write=writer, worker=f"dp{rank}")
        if writer:
            progress(records)
    if parallel.is_initialized():
        import torch.distributed as dist

        dist.barrier()


def _run_ray(
    batches, out: Path, options: JobOptions, make_pipeline, address: str | None, progress: Progress
) -> None:
    import ray

    from cogvideo.raystart import start_ray

    if options.tensor_parallel > 1:
        raise ValueError(
            "sampling.tensor_parallel > 1 runs one process per TP rank under torchrun "
            "(torchrun --nproc-per-node N -m cogvideo.sampling.cli ...), not with --ray"
        )
    start_ray(address, log_to_driver=True)

    @ray.remote(num_gpus=1 if options.device == "cuda" else 0)
    class SamplerActor:
        def __init__(self, make):
            self.pipeline = make()

        def run(self, batch, out_dir):
            worker = f"actor-{ray.get_runtime_context().get_actor_id()[:8]}"
            return sample_batch(self.pipeline, batch, Path(out_dir), worker=worker)

    queue = list(batches)
    actors = [SamplerActor.remote(make_pipeline) for _ in range(min(options.workers, len(queue)))]
    pending = {}

    def give(actor):
        if queue:
            batch = queue.pop(0)
            pending[actor.run.remote(batch, str(out))] = (actor, batch)

    for actor in actors:
        give(actor)
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        actor, batch = pending.pop(done)
        try:
            records = ray.get(done)
        except Exception as err:  # the actor itself failed (load error, crash): record the batch
            records = [_failed(prompt, err) for prompt in batch]
            for prompt, record in zip(batch, records):
                (out / prompt.key).mkdir(parents=True, exist_ok=True)
                write_json(out / prompt.key / RECORD, record)
        progress(records)
        give(actor)
    for actor in actors:
        ray.kill(actor)


def write_manifest(out: Path, prompts: list[Prompt]) -> dict:
    entries = [
        read_record(out, p.key) or {"key": p.key, "prompt": p.text, "status": "missing"} for p in prompts
    ]
    ok = [e for e in entries if e["status"] == "ok"]
    manifest = {"prompts": len(entries), "ok": len(ok), "failed": len(entries) - len(ok), "entries": entries}
    write_json(out / "manifest.json", manifest)
    if ok:
        write_contact_sheet(
            out / "contact_sheet.png", [(e["prompt"], out / e["key"] / e["files"]["sheet_row"]) for e in ok]
        )
    return manifest


def run_job(
    prompts: list[Prompt],
    out: str | Path,
    options: JobOptions,
    load: Callable,
    precision: Callable | None = None,
    use_ray: bool = False,
    address: str | None = None,
) -> dict | None:
    """Sample every prompt not already done with the pipeline `load(options)` builds in each worker;
    returns the manifest (None on ranks other than 0). `precision(options)`: the pipeline's
    PrecisionChoice, which resolves `dtype: auto` once for the job (module docstring). One job at
    a time per `out` (its LOCK, held by rank 0 or the Ray driver; LockHeld when a live job holds it)."""
    out = Path(out)
    lock = RunLock(out, key="--out") if _is_main_process() else None
    if lock is not None and (took_over := lock.acquire()) is not None:
        log.warning(took_over)
    try:
        return _sample(prompts, out, options, load, precision, use_ray, address)
    finally:
        if lock is not None:
            lock.release()


def _sample(prompts, out: Path, options, load, precision, use_ray: bool, address) -> dict | None:
    out.mkdir(parents=True, exist_ok=True)
    options = settle_precision(out, options, precision)
    _check_options(out, options)
    make_pipeline = functools.partial(load, options)
    todo = [p for p in prompts if (read_record(out, p.key) or {}).get("status") != "ok"]
    if len(todo) < len(prompts):
        log.info("%d of %d prompts already done in %s", len(prompts) - len(todo), len(prompts), out)
    batches = [todo[i : i + options.batch_size] for i in range(0, len(todo), options.batch_size)]
    if batches:
        progress = Progress(len(todo))
        if use_ray:
            _run_ray(batches, out, options, make_pipeline, address, progress)
        else:
            _run_local(batches, out, make_pipeline, progress)
    return write_manifest(out, prompts) if _is_main_process() else None

"""The preparation job on Ray Data: videos + captions -> shards, manifest, rejected, summary.

    driver: list inputs, check captions, skip finished inputs (resume)
    Ray:    content hash of every input                     (tasks of a few inputs: task_count)
    driver: drop exact duplicates (this run and earlier runs)
    Ray:    probe -> clips at scene cuts -> frame-rate rule -> frames      (flat_map, the same tasks)
         -> encode on actors that load the family's encoder once        (map_batches, batched)
            (the image tokenizer for token shards: data_prep.encoders)
    driver: stream the samples, in input order, into shards (data_prep.output)

The Ray side is in data_prep.stages.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import ray
from tqdm import tqdm

from cogvideo.captions import near_match
from cogvideo.configio import ConfigError, config_parser, parse_config, save_yaml
from cogvideo.raystart import RAY_ACTOR_ARGS_NOTICE, RayStartError, start_ray, stderr_without
from cogvideo.runlock import LockHeld, RunLock
from cogvideo.video_io import Listing
from data_prep.config import PrepConfig, prep_model
from data_prep.encoders import encoder_for
from data_prep.inputs import (
    Captions,
    caption_for,
    ignored_rows,
    list_inputs,
    load_captions,
    unmatched_rows,
)
from data_prep.output import REJECTED, PrepOutput
from data_prep.stages import FIELD, EncodeSamples, extract_encoded, extract_samples, hash_input


def plan_inputs(
    listing: Listing, captions_file: str | None, out: PrepOutput
) -> tuple[list[dict], list[dict], list[dict]]:
    """(inputs to hash, inputs rejected on the driver, rows for what is no input: caption rows
    without a video, superseded caption rows, ignored files). Finished inputs (earlier runs) are
    skipped. A path listed again is the entry `path#2`, `path#3`, ... and is rejected as a duplicate."""
    captions = load_captions(captions_file) if captions_file else None
    todo, rejected, seen, uncaptioned = [], [], {}, []
    for path in listing.files:
        real = os.path.realpath(path)
        seen[real] = seen.get(real, 0) + 1
        entry = path if seen[real] == 1 else f"{path}#{seen[real]}"
        caption = caption_for(path, captions)
        if caption.problem == "missing_caption" and seen[real] == 1:
            uncaptioned.append(path)
        if entry in out.finished:
            continue
        if seen[real] > 1:
            rejected.append(_rejected_input(entry, path, "duplicate_path", f"listed {seen[real]} times"))
        elif caption.problem:
            rejected.append(_rejected_input(entry, path, caption.problem, caption.detail))
        else:
            todo.append({"entry": entry, "path": path, "caption": caption.caption})
    if captions is None:
        return todo, rejected, ignored_rows(listing)
    unmatched = unmatched_rows(captions, listing, uncaptioned, earlier=out.finished)
    for record in rejected:
        if record["reason"] == "missing_caption":
            record["detail"] += _did_you_mean(record["source"], captions, unmatched)
    return todo, rejected, unmatched


def _did_you_mean(video: str, captions: Captions, unmatched: list[dict]) -> str:
    """ "; did you mean ROW (PATH)?" for a caption row without a video whose path nearly names `video`."""
    rows = {
        captions.by_video[r["source"]].path: r["entry"]
        for r in unmatched
        if r["reason"] == "caption_without_video"
    }
    guess = near_match(os.path.relpath(video, captions.file.parent), list(rows))
    return f"; did you mean {rows[guess]} ({guess})?" if guess else ""


def _rejected_input(entry: str, path: str, reason: str, detail: str, sha256: str = "") -> dict:
    return {
        "entry": entry,
        "source": path,
        "sha256": sha256,
        "status": "rejected",
        "reason": reason,
        "detail": detail,
        "clips": 0,
        "samples": 0,
        "seconds": 0.0,
        "frames": 0,
    }


def _record_rejection(out: PrepOutput, record: dict) -> None:
    out.add_rejection(
        {
            "entry": record["entry"],
            "source": record["source"],
            "clip": None,
            "reason": record["reason"],
            "detail": record.pop("detail"),
        }
    )
    out.finish_input(record)


def settled(cfg: PrepConfig) -> tuple[PrepConfig, object]:
    """Before Ray starts: the family's encoder is checked on the driver (for token shards: the
    image tokenizer loads and fits the model, and an unset model.preset becomes the preset the
    tokenizer was fitted for); the config as the job runs it and the model the shards are for."""
    cfg = encoder_for(cfg).settle(cfg)
    return cfg, prep_model(cfg)


def run_prep(
    cfg: PrepConfig,
    inputs: list[str],
    out_dir: str | Path,
    captions: str | None = None,
    address: str | None = None,
    progress: bool = True,
) -> dict:
    """Prepare (or finish preparing) `out_dir` from the videos matched by `inputs`; the summary.
    One run at a time per `out_dir` (its LOCK; LockHeld when a live run holds it)."""
    cfg, model = settled(cfg)
    lock = RunLock(out_dir, key="--out")
    if (took_over := lock.acquire()) is not None:
        print(f"cogvideo-prep: {took_over}", file=sys.stderr)
    try:
        return _prepare(cfg, model, inputs, out_dir, captions, address, progress)
    finally:
        lock.release()


def _prepare(cfg: PrepConfig, model, inputs, out_dir, captions, address, progress: bool) -> dict:
    started = time.perf_counter()
    out = PrepOutput(out_dir, cfg.shard_samples, cfg.shard_bytes)
    save_yaml(cfg, Path(out_dir) / "prep_config.yaml")
    todo, rejected, unmatched = plan_inputs(list_inputs(inputs, cfg.extensions, captions), captions, out)
    report_unmatched(unmatched, rejected, out)
    for record in rejected:
        _record_rejection(out, record)

    start_ray(address, cfg.num_cpus)
    with ordered_data_context(), stderr_without(RAY_ACTOR_ARGS_NOTICE):
        run = _run_jobs(cfg, model, out, todo, progress)
    run["inputs_processed"] += len(rejected)
    out.commit()
    out.record_unmatched(unmatched)
    wall = time.perf_counter() - started
    run.update(
        wall_s=round(wall, 3),
        frames_per_s=round(run["frames_decoded"] / wall, 1),
        samples_per_s=round(run["samples_written"] / wall, 2),
    )
    summary = out.summary(run)
    out.write_summary(summary)
    return summary


def report_unmatched(unmatched: list[dict], rejected: list[dict], out: PrepOutput, shown: int = 5) -> None:
    """Before Ray starts: what of the captions and folders is no input, and inputs without a
    caption, counted on one line pointing to rejected.jsonl, then up to `shown` near matches."""
    counts = Counter(r["reason"] for r in unmatched)
    counts["missing_caption"] = sum(r["reason"] == "missing_caption" for r in rejected)
    words = {
        "caption_without_video": "caption row(s) name no input video",
        "missing_caption": "video(s) have no caption",
        "caption_superseded": "caption row(s) captioned a video again",
        "ignored_file": "file(s) in the input folders are not videos by extension (prep.extensions)",
    }
    parts = [f"{counts[reason]} {text}" for reason, text in words.items() if counts[reason]]
    if not parts:
        return
    print(f"cogvideo-prep: {'; '.join(parts)}: each is listed in {out.root / REJECTED}", file=sys.stderr)
    guesses = [r["detail"] for r in unmatched + rejected if "did you mean" in r["detail"]]
    for detail in guesses[:shown]:
        print(f"  {detail}", file=sys.stderr)


@contextlib.contextmanager
def ordered_data_context():
    """Ray Data in input order (so shards are the same on every run), without its own progress
    bars and without per-operator resource reservation, for this job only: the context is
    process-wide. Ray Data 2.60 reserves half the cluster for each operator; on 2 CPUs that kept
    one extraction task running where two could (16 half-second tasks: 6.1 s instead of 4.2).
    The job has one task operator; an encoder actor pool holds its resources from its start."""
    context = ray.data.DataContext.get_current()
    saved = (
        context.execution_options.preserve_order,
        context.enable_progress_bars,
        context.op_resource_reservation_enabled,
    )
    context.execution_options.preserve_order, context.enable_progress_bars = True, False
    context.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        (
            context.execution_options.preserve_order,
            context.enable_progress_bars,
            context.op_resource_reservation_enabled,
        ) = saved


# Sized tasks (prep.inputs_per_task=0): at least TASKS_PER_CPU tasks for each CPU of the cluster,
# so that the last ones are short and no core waits long at the end, and at most
# MAX_INPUTS_PER_TASK inputs in one, so that an interrupted task redoes little. Fewer, larger
# tasks than one per video: each costs Ray tens of ms of scheduling, start and result transfer,
# which was the job's largest overhead on short videos (benchmarks/bench_data_prep.py).
TASKS_PER_CPU = 4
MAX_INPUTS_PER_TASK = 32


def task_count(inputs: int, cfg: PrepConfig, cpus: float) -> int:
    """Ray tasks (blocks) for `inputs` videos on a cluster of `cpus` CPUs."""
    if cfg.inputs_per_task:
        return -(-inputs // cfg.inputs_per_task)
    spread = max(1, int(cpus)) * TASKS_PER_CPU
    return min(inputs, max(spread, -(-inputs // MAX_INPUTS_PER_TASK)))


def _blocks(inputs: int, cfg: PrepConfig) -> int:
    return task_count(inputs, cfg, ray.cluster_resources().get("CPU", 1))


def _run_jobs(cfg: PrepConfig, model, out: PrepOutput, todo: list[dict], progress: bool) -> dict:
    """Hash, deduplicate, then extract + encode + write; this run's counts."""
    accepted = _deduplicate(cfg, out, todo)
    run = {"inputs_processed": len(todo), "frames_decoded": 0, "samples_written": 0}
    if accepted:
        bar = tqdm(total=len(accepted), desc="videos", unit="video", disable=not progress)
        for row in _encoded(cfg, model, accepted).iter_rows():
            _write_row(out, row, run, bar)
        bar.close()
    return run


def _deduplicate(cfg: PrepConfig, out: PrepOutput, todo: list[dict]) -> list[dict]:
    """Hash the inputs (a Ray job); unreadable inputs and content already in `out` (or earlier in
    `todo`) are recorded as rejected; returns the hashed rows of the rest."""
    known = dict(out.hashes)
    accepted = []
    if not todo:
        return accepted
    hashed = ray.data.from_items(todo, override_num_blocks=_blocks(len(todo), cfg)).map(hash_input)
    for row in hashed.iter_rows():
        if row["reason"]:
            _record_rejection(out, _rejected_input(row["entry"], row["path"], row["reason"], row["detail"]))
        elif row["sha256"] in known:
            _record_rejection(
                out,
                _rejected_input(
                    row["entry"],
                    row["path"],
                    "duplicate_content",
                    f"same sha256 as {known[row['sha256']]}",
                    row["sha256"],
                ),
            )
        else:
            known[row["sha256"]] = row["path"]
            accepted.append(row)
    return accepted


GOLDEN = (5**0.5 - 1) / 2


def balanced(rows: list[dict]) -> list[dict]:
    """`rows` (inputs with their byte `size`) in an order whose every contiguous run holds big and
    small inputs alike, so that Ray's contiguous blocks, however many, share the bytes: ranked by
    size, rank r placed at frac(r x 0.618...) (the golden-ratio sequence spreads any run of
    ranks evenly). The order depends on the inputs alone, not on the task layout, so the shards
    do not either. Inputs listed by name come in runs of like videos: in blocks as listed, one
    block of the longest kept a core busy for 4.9 s while the others took 0.4 s each
    (benchmarks/bench_data_prep.py)."""
    by_size = sorted(rows, key=lambda row: -row["size"])
    return [by_size[rank] for rank in sorted(range(len(by_size)), key=lambda rank: rank * GOLDEN % 1.0)]


def _encoded(cfg: PrepConfig, model, accepted: list[dict]) -> ray.data.Dataset:
    """The Ray job that extracts clips from the accepted inputs and encodes them: in the same
    tasks, or on an actor pool (prep.tokenizer_actors)."""
    gpus = cfg.gpus_per_actor(ray.cluster_resources().get("GPU", 0))
    actors = cfg.encoder_actors(gpus)
    encoder = encoder_for(cfg)
    blocks = _blocks(len(accepted), cfg)
    inputs = ray.data.from_items(balanced(accepted), override_num_blocks=blocks)
    extract = {"cfg": cfg, "model": model, "frame_size": encoder.pixel_size(model)}
    if not actors:
        return inputs.flat_map(extract_encoded, fn_kwargs={**extract, "encoder": encoder})
    return inputs.flat_map(extract_samples, fn_kwargs=extract).map_batches(
        EncodeSamples,
        fn_constructor_kwargs={
            "cfg": cfg,
            "model": model,
            "encoder": encoder,
            "device": "cuda" if gpus > 0 else "cpu",
        },
        batch_size=cfg.tokenize_batch,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.tokenizer_cpus,
        num_gpus=gpus or None,
        batch_format="numpy",
    )


def _write_row(out: PrepOutput, row: dict, run: dict, bar: tqdm) -> None:
    """One row of the encode job: a sample (into the shards and manifest), a rejection, or the
    end of an input (counted in `run` and on `bar`)."""
    record = json.loads(row["record"])
    if row["kind"] == "sample":
        fields = {
            "__key__": row["key"],
            **{name.removeprefix(FIELD): value for name, value in row.items() if name.startswith(FIELD)},
        }
        meta = record["meta"]
        manifest = {
            "key": row["key"],
            "source": meta["source"],
            "clip": record["clip"],
            "window": [meta["clip_start"], meta["clip_end"]],
            "fps": meta["fps"],
            "stage": meta["stage"],
            "video": record["video"],
        }
        run["samples_written"] += out.add_sample(fields, manifest)
    elif row["kind"] == "rejected":
        out.add_rejection(record)
    else:
        run["frames_decoded"] += record["frames"]
        out.finish_input(record)
        bar.update()


def run_cli(argv: list[str] | None = None) -> dict:
    """cogvideo-prep --input DIR_OR_GLOB --captions FILE --out DIR [--address ray://...]
    [--config prep.yaml] [key=value ...]"""
    parser = config_parser(PrepConfig, "cogvideo-prep", "Videos + captions -> shards for the model's family.")
    parser.add_argument("--input", action="append", required=True, help="folder, file or glob (repeatable)")
    parser.add_argument("--captions", help="CSV or JSONL with path,caption (default: sidecar .txt files)")
    parser.add_argument("--out", required=True, help="output folder (rerun to resume)")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--no-progress", action="store_true")
    cfg, args = parse_config(PrepConfig, parser, argv)
    summary = run_prep(cfg, args.input, args.out, args.captions, args.address, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    try:
        run_cli(argv)
    except ConfigError as err:
        print(f"cogvideo-prep: bad config: {err}", file=sys.stderr)
        sys.exit(2)
    except LockHeld as err:
        print(f"cogvideo-prep: {err}", file=sys.stderr)
        sys.exit(2)
    except RayStartError as err:
        print(f"cogvideo-prep: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

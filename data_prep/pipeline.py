"""The preparation job on Ray Data: videos + captions -> token shards, manifest, rejected, summary.

    driver: list inputs, check captions, skip finished inputs (resume)
    Ray:    content hash of every input                     (task per input)
    driver: drop exact duplicates (this run and earlier runs)
    Ray:    probe -> clips at scene cuts -> frame-rate rule -> frames      (flat_map, task per input)
         -> tokenize on actors that load the tokenizer once             (map_batches, batched)
    driver: stream the samples, in input order, into shards (data_prep.output)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from cogvideo.configio import ConfigError, load_config, save_yaml
from cogvideo.shards import CAPTION_KEY, FRAMES_KEY, META_KEY, ClipMeta, encode_sample
from data_prep.config import Geometry, PrepConfig, geometry
from data_prep.inputs import Rejected, caption_for, content_hash, list_inputs, load_captions
from data_prep.output import PrepOutput
from data_prep.rates import frame_indices, plan_samples
from data_prep.video import iter_clips, probe

EMPTY = b""


def sample_key(sha256: str, clip: int, stage: int, fps: float) -> str:
    """Deterministic and content-derived: the same clip sample always gets the same key."""
    return f"{sha256[:16]}_{clip:04d}_s{stage}_{round(fps * 1000):06d}mfps"


def _row(entry: str, kind: str, record: dict, key: str = "", pixels: bytes = EMPTY) -> dict:
    return {"entry": entry, "kind": kind, "key": key, "record": json.dumps(record, ensure_ascii=False),
            "pixels": pixels}


def hash_input(row: dict) -> dict:
    try:
        sha256, size = content_hash(row["path"])
        return {**row, "sha256": sha256, "size": size, "reason": "", "detail": ""}
    except Rejected as err:
        return {**row, "sha256": "", "size": 0, "reason": err.reason, "detail": err.detail}


def extract_samples(row: dict, cfg: PrepConfig, shape: Geometry) -> list[dict]:
    """All rows one input yields: samples (frames as raw pixels), rejected clips, then one
    `input` row. An input that fails part-way yields no samples at all."""
    path, entry = row["path"], row["entry"]
    record = {"entry": entry, "source": path, "sha256": row["sha256"], "clips": 0, "samples": 0,
              "seconds": 0.0, "frames": 0}
    rows = []
    try:
        info = probe(path, cfg)
        fps = float(info.fps)
        for clip in iter_clips(path, info, cfg, shape.frame_size):
            record["clips"] += 1
            span = (clip.first_frame / fps, (clip.first_frame + len(clip.frames)) / fps)
            rejected = {"entry": entry, "source": path, "clip": span}
            if len(clip.frames) / fps < cfg.min_clip_s:
                rows.append(_row(entry, "rejected", {**rejected, "reason": "clip_shorter_than_min",
                                 "detail": f"{len(clip.frames) / fps:.3f} s < min_clip_s={cfg.min_clip_s}"}))
                continue
            plan = plan_samples(len(clip.frames), fps, shape.num_frames, cfg.stages, cfg.stage1_fps, cfg.stage2_fps)
            if not plan:
                rows.append(_row(entry, "rejected", {**rejected, "reason": "clip_too_short_for_frames",
                                 "detail": f"{(len(clip.frames) - 1) / fps:.3f} s between first and last frame "
                                           f"cannot hold {shape.num_frames} frames at any rate <= {fps:g} fps"}))
                continue
            for stage, rate in plan:
                picked = frame_indices(len(clip.frames), fps, rate, shape.num_frames)
                window = ((clip.first_frame + picked[0]) / fps, (clip.first_frame + picked[-1]) / fps)
                meta = ClipMeta(duration=(shape.num_frames - 1) / rate, fps=rate, stage=stage, source=path,
                                clip_start=window[0], clip_end=window[1], num_frames=shape.num_frames)
                sample = {"caption": row["caption"], "meta": asdict(meta), "clip": span}
                rows.append(_row(entry, "sample", sample, sample_key(row["sha256"], clip.index, stage, rate),
                                 np.ascontiguousarray(clip.frames[picked]).tobytes()))
                record["samples"] += 1
        record.update(seconds=info.seconds, frames=info.num_frames)
    except Exception as err:  # one odd file must not stop a job over millions
        reason, detail = (err.reason, err.detail) if isinstance(err, Rejected) else \
            ("unexpected_error", f"{path}: {type(err).__name__}: {err}")
        failure = {"entry": entry, "source": path, "clip": None, "reason": reason, "detail": detail}
        return [_row(entry, "rejected", failure), _row(entry, "input", {**record, "status": "rejected",
                                                                         "reason": reason})]
    if not record["samples"]:
        reasons = sorted({json.loads(r["record"])["reason"] for r in rows})
        rows.append(_row(entry, "rejected", {"entry": entry, "source": path, "clip": None, "reason": "no_usable_clip",
                                             "detail": f"{record['clips']} clip(s) rejected: {', '.join(reasons)}"}))
        return rows + [_row(entry, "input", {**record, "status": "rejected", "reason": "no_usable_clip"})]
    return rows + [_row(entry, "input", {**record, "status": "used", "reason": ""})]


def load_object(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


class TokenizeSamples:
    """Ray actor: loads the image tokenizer once, encodes the frames of a batch of samples
    together and returns them as shard fields (cogvideo.shards.encode_sample)."""

    def __init__(self, cfg: PrepConfig, shape: Geometry):
        device = "cuda" if cfg.tokenizer_gpus > 0 else "cpu"
        self.tokenizer = load_object(cfg.tokenizer_loader)(cfg.tokenizer, device=device)
        got = (self.tokenizer.frame_size, self.tokenizer.tokens_side)
        if got != (shape.frame_size, shape.tokens_side):
            raise ConfigError(f"prep.tokenizer {cfg.tokenizer}: encodes {got[0]}px frames to {got[1]}x{got[1]} codes, "
                              f"but the model ({cfg.model_preset}) needs {shape.frame_size}px and "
                              f"{shape.tokens_side}x{shape.tokens_side} (model.frame_size, model.frame_tokens)")
        self.shape = shape

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, size = self.shape.num_frames, self.shape.frame_size
        count = len(batch["kind"])
        fields = {name: np.full(count, EMPTY, dtype=object) for name in ("frames_npy", "caption_txt", "meta_json")}
        samples = [i for i in range(count) if batch["kind"][i] == "sample"]
        if samples:
            pixels = np.stack([np.frombuffer(batch["pixels"][i], np.uint8).reshape(n, size, size, 3) for i in samples])
            codes = self.tokenizer.encode(pixels.reshape(-1, size, size, 3)).reshape(len(samples), n, *([self.shape.tokens_side] * 2))
            for i, sample_codes in zip(samples, codes):
                record = json.loads(batch["record"][i])
                encoded = encode_sample(batch["key"][i], sample_codes, record["caption"], ClipMeta(**record["meta"]))
                fields["frames_npy"][i] = encoded[FRAMES_KEY]
                fields["caption_txt"][i] = encoded[CAPTION_KEY]
                fields["meta_json"][i] = encoded[META_KEY]
        return {"entry": batch["entry"], "kind": batch["kind"], "key": batch["key"], "record": batch["record"], **fields}


def init_ray(address: str | None, num_cpus: int) -> None:
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)


def plan_inputs(paths: list[str], captions_file: str | None, out: PrepOutput) -> tuple[list[dict], list[dict]]:
    """(inputs to hash, inputs rejected on the driver). Finished inputs (earlier runs) are skipped.
    A path listed again is the entry `path#2`, `path#3`, ... and is rejected as a duplicate."""
    captions = load_captions(captions_file) if captions_file else None
    todo, rejected, seen = [], [], {}
    for path in paths:
        real = os.path.realpath(path)
        seen[real] = seen.get(real, 0) + 1
        entry = path if seen[real] == 1 else f"{path}#{seen[real]}"
        if entry in out.finished:
            continue
        if seen[real] > 1:
            rejected.append(_rejected_input(entry, path, "duplicate_path", f"listed {seen[real]} times"))
            continue
        caption = caption_for(path, captions)
        if caption.problem:
            rejected.append(_rejected_input(entry, path, caption.problem, caption.detail))
            continue
        todo.append({"entry": entry, "path": path, "caption": caption.text})
    return todo, rejected


def _rejected_input(entry: str, path: str, reason: str, detail: str, sha256: str = "") -> dict:
    return {"entry": entry, "source": path, "sha256": sha256, "status": "rejected", "reason": reason,
            "detail": detail, "clips": 0, "samples": 0, "seconds": 0.0, "frames": 0}


def _record_rejection(out: PrepOutput, record: dict) -> None:
    out.add_rejection({"entry": record["entry"], "source": record["source"], "clip": None,
                       "reason": record["reason"], "detail": record.pop("detail")})
    out.finish_input(record)


def run_prep(cfg: PrepConfig, inputs: list[str], out_dir: str | Path, captions: str | None = None,
             address: str | None = None, progress: bool = True) -> dict:
    """Prepare (or finish preparing) `out_dir` from the videos matched by `inputs`; the summary."""
    shape = geometry(cfg)
    if not cfg.tokenizer:
        raise ConfigError("prep.tokenizer: the image tokenizer path is required")
    started = time.perf_counter()
    out = PrepOutput(out_dir, cfg.shard_samples, cfg.shard_bytes)
    save_yaml(cfg, Path(out_dir) / "prep_config.yaml")
    todo, rejected = plan_inputs(list_inputs(inputs, cfg.extensions), captions, out)
    for record in rejected:
        _record_rejection(out, record)

    init_ray(address, cfg.num_cpus)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards are the same on every run
    context.enable_progress_bars = False
    known = out.committed_hashes()
    accepted = []
    if todo:
        hashed = ray.data.from_items(todo, override_num_blocks=len(todo)).map(hash_input)
        for row in hashed.iter_rows():
            if row["reason"]:
                _record_rejection(out, _rejected_input(row["entry"], row["path"], row["reason"], row["detail"]))
            elif row["sha256"] in known:
                _record_rejection(out, _rejected_input(row["entry"], row["path"], "duplicate_content",
                                                       f"same sha256 as {known[row['sha256']]}", row["sha256"]))
            else:
                known[row["sha256"]] = row["path"]
                accepted.append(row)
    run = {"inputs_processed": len(todo) + len(rejected), "frames_decoded": 0, "samples_written": 0}
    if accepted:
        rows = (ray.data.from_items(accepted, override_num_blocks=len(accepted))
                .flat_map(extract_samples, fn_kwargs={"cfg": cfg, "shape": shape})
                .map_batches(TokenizeSamples, fn_constructor_kwargs={"cfg": cfg, "shape": shape},
                             batch_size=cfg.tokenize_batch,
                             compute=ray.data.ActorPoolStrategy(size=cfg.tokenizer_actors),
                             num_gpus=cfg.tokenizer_gpus or None, batch_format="numpy"))
        bar = tqdm(total=len(accepted), desc="videos", unit="video", disable=not progress)
        for row in rows.iter_rows():
            record = json.loads(row["record"])
            if row["kind"] == "sample":
                fields = {"__key__": row["key"], FRAMES_KEY: row["frames_npy"], CAPTION_KEY: row["caption_txt"],
                          META_KEY: row["meta_json"]}
                meta = record["meta"]
                manifest = {"key": row["key"], "source": meta["source"], "clip": record["clip"],
                            "window": [meta["clip_start"], meta["clip_end"]], "fps": meta["fps"],
                            "stage": meta["stage"]}
                run["samples_written"] += out.add_sample(fields, manifest)
            elif row["kind"] == "rejected":
                out.add_rejection(record)
            else:
                run["frames_decoded"] += record["frames"]
                out.finish_input(record)
                bar.update()
        bar.close()
    out.commit()
    wall = time.perf_counter() - started
    run.update(wall_s=round(wall, 3), frames_per_s=round(run["frames_decoded"] / wall, 1),
               samples_per_s=round(run["samples_written"] / wall, 2))
    summary = out.summary(run)
    out.write_summary(summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    """cogvideo-prep --input DIR_OR_GLOB --captions FILE --out DIR [--address ray://...] [--config prep.yaml] [key=value ...]"""
    parser = argparse.ArgumentParser(prog="cogvideo-prep", description="Videos + captions -> token shards.")
    parser.add_argument("--input", action="append", required=True, help="folder, file or glob (repeatable)")
    parser.add_argument("--captions", help="CSV or JSONL with path,caption (default: sidecar .txt files)")
    parser.add_argument("--out", required=True, help="output folder (rerun to resume)")
    parser.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--config", help="YAML file with PrepConfig fields")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tokenizer=tok.safetensors stages=[1]")
    args = parser.parse_args(argv)
    cfg = load_config(PrepConfig, args.config, args.overrides)
    summary = run_prep(cfg, args.input, args.out, args.captions, args.address, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

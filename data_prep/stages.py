"""The Ray tasks and actors of the preparation job: they run on workers, one input or one batch
of samples at a time, and return plain rows (bytes and JSON) to the driver."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from cogvideo.shards import CAPTION_KEY, META_KEY, ClipMeta, encode_sample, sample_fields
from data_prep.config import PrepConfig
from data_prep.inputs import Rejected, content_hash
from data_prep.rates import frames_at, plan_samples, source_rate
from data_prep.video import Clip, VideoInfo, iter_clips, probe

EMPTY = b""


def sample_key(sha256: str, clip: int, stage: int, fps: float) -> str:
    """Deterministic and content-derived: the same clip sample always gets the same key."""
    return f"{sha256[:16]}_{clip:04d}_s{stage}_{round(fps * 1000):06d}mfps"


def _row(entry: str, kind: str, record: dict, key: str = "", pixels: bytes = EMPTY) -> dict:
    return {
        "entry": entry,
        "kind": kind,
        "key": key,
        "record": json.dumps(record, ensure_ascii=False),
        "pixels": pixels,
    }


def hash_input(row: dict) -> dict:
    try:
        sha256, size = content_hash(row["path"])
        return {**row, "sha256": sha256, "size": size, "reason": "", "detail": ""}
    except Rejected as err:
        return {**row, "sha256": "", "size": 0, "reason": err.reason, "detail": err.detail}


def clip_rows(row: dict, clip: Clip, info: VideoInfo, cfg: PrepConfig, model) -> list[dict]:
    """One clip's sample rows (frames as raw pixels, chosen by presentation time), or one
    `rejected` row saying why it has none."""
    entry, path, times = row["entry"], row["path"], clip.times
    span = (
        float(times[0]),
        float(times[-1]) + 1 / float(info.fps),
    )  # the last frame is shown for one nominal frame
    seconds, between = span[1] - span[0], float(times[-1] - times[0])
    source_fps = source_rate(times, cfg.vfr_tolerance)
    plan = (
        []
        if seconds < cfg.min_clip_s
        else plan_samples(between, source_fps, model.num_frames, cfg.stages, cfg.stage1_fps, cfg.stage2_fps)
    )
    if not plan:
        if seconds < cfg.min_clip_s:
            reason, detail = "clip_shorter_than_min", f"{seconds:.3f} s < min_clip_s={cfg.min_clip_s}"
        else:
            reason = "clip_too_short_for_frames"
            detail = (
                f"{between:.3f} s between first and last frame cannot hold {model.num_frames} frames at "
                f"any configured rate <= {source_fps:g} fps"
            )
        return [
            _row(
                entry,
                "rejected",
                {"entry": entry, "source": path, "clip": span, "reason": reason, "detail": detail},
            )
        ]
    rows = []
    for stage, rate in plan:
        picked = frames_at(times, rate, model.num_frames)
        meta = ClipMeta(
            duration=(model.num_frames - 1) / rate,
            fps=rate,
            stage=stage,
            source=path,
            clip_start=float(times[picked[0]]),
            clip_end=float(times[picked[-1]]),
            num_frames=model.num_frames,
        )
        sample = {"caption": row["caption"], "meta": asdict(meta), "clip": span, "video": info.properties}
        rows.append(
            _row(
                entry,
                "sample",
                sample,
                sample_key(row["sha256"], clip.index, stage, rate),
                np.ascontiguousarray(clip.frames[picked]).tobytes(),
            )
        )
    return rows


def extract_samples(row: dict, cfg: PrepConfig, model, frame_size: int | None = None) -> list[dict]:
    """All rows one input yields: its clips' rows, then one `input` row (its record for the
    commit log). An input that fails part-way yields no samples at all. `frame_size`: the side
    frames are read at (the encoder's; default the model's)."""
    path, entry = row["path"], row["entry"]
    record = {
        "entry": entry,
        "source": path,
        "sha256": row["sha256"],
        "clips": 0,
        "samples": 0,
        "seconds": 0.0,
        "frames": 0,
    }
    rows = []
    try:
        info = probe(path, cfg)
        for clip in iter_clips(path, info, cfg, frame_size or model.frame_size):
            rows += clip_rows(row, clip, info, cfg, model)
            record["clips"] += 1
        record.update(
            seconds=info.seconds,
            frames=info.num_frames,
            video=info.properties,
            samples=sum(r["kind"] == "sample" for r in rows),
        )
    except Exception as err:  # one odd file must not stop a job over millions
        reason, detail = (
            (err.reason, err.detail)
            if isinstance(err, Rejected)
            else ("unexpected_error", f"{path}: {type(err).__name__}: {err}")
        )
        failure = {"entry": entry, "source": path, "clip": None, "reason": reason, "detail": detail}
        return [
            _row(entry, "rejected", failure),
            _row(entry, "input", {**record, "status": "rejected", "reason": reason}),
        ]
    if not record["samples"]:
        reasons = sorted({json.loads(r["record"])["reason"] for r in rows})
        rows.append(
            _row(
                entry,
                "rejected",
                {
                    "entry": entry,
                    "source": path,
                    "clip": None,
                    "reason": "no_usable_clip",
                    "detail": f"{record['clips']} clip(s) rejected: {', '.join(reasons)}",
                },
            )
        )
        return rows + [_row(entry, "input", {**record, "status": "rejected", "reason": "no_usable_clip"})]
    return rows + [_row(entry, "input", {**record, "status": "used", "reason": ""})]


FIELD = "field:"  # prefix of the columns that carry a sample's shard fields (bytes) to the driver


class EncodeSamples:
    """Ray actor: loads the family's encoder once (a class of data_prep.encoders, chosen on the
    driver), encodes the frames of a batch of samples together and returns them as shard fields
    (cogvideo.shards.encode_sample)."""

    def __init__(self, cfg: PrepConfig, model, encoder, device: str = "cpu"):
        self.encode = encoder(cfg, model, device)
        self.kind = encoder.kind
        self.fields = [f"{name}.npy" for name in encoder.arrays] + [CAPTION_KEY, META_KEY]
        side = encoder.pixel_size(model)
        self.shape = (model.num_frames, side, side, 3)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["kind"])
        samples = [i for i in range(count) if batch["kind"][i] == "sample"]
        columns = {FIELD + name: np.full(count, EMPTY, dtype=object) for name in self.fields}
        if samples:
            pixels = np.stack(
                [np.frombuffer(batch["pixels"][i], np.uint8).reshape(self.shape) for i in samples]
            )
            arrays = self.encode(pixels)
            for j, i in enumerate(samples):
                record = json.loads(batch["record"][i])
                meta = ClipMeta(**{**record["meta"], "kind": self.kind})
                fields = sample_fields(
                    encode_sample(
                        batch["key"][i], {k: v[j] for k, v in arrays.items()}, record["caption"], meta
                    )
                )
                for name, value in fields.items():
                    columns[FIELD + name][i] = value
        return {**{k: batch[k] for k in ("entry", "kind", "key", "record")}, **columns}


_TASK_ENCODERS: dict[str, EncodeSamples] = {}  # this worker process's, by their settings


def extract_encoded(row: dict, cfg: PrepConfig, model, encoder, frame_size: int) -> list[dict]:
    """`extract_samples`' rows with their samples encoded in this task, as EncodeSamples returns
    them, where the job starts no encoder actors (prep.tokenizer_actors); the encoder is loaded
    once per worker process."""
    key = repr((cfg, model, encoder))
    if key not in _TASK_ENCODERS:
        _TASK_ENCODERS[key] = EncodeSamples(cfg, model, encoder)
    rows = extract_samples(row, cfg, model, frame_size)
    columns = {name: np.array([r[name] for r in rows], dtype=object) for name in rows[0]}
    encoded = _TASK_ENCODERS[key](columns)
    return [{name: column[i] for name, column in encoded.items()} for i in range(len(rows))]

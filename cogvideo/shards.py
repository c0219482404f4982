"""The token-shard schema: the one definition shared by data preparation (writer) and
training (reader).

A WebDataset sample is a tar member group with the same `__key__`:

    {key}.frames.npy   int16/int32 array [frames, h, w] of image-token codes
    {key}.caption.txt  UTF-8 caption, without any duration prefix
    {key}.meta.json    ClipMeta as JSON

The duration prefix ("4.0秒<n>") is composed at load time from `meta.duration` by the text
format (`cogvideo.text_format`), so the format can change without re-preparing data.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, fields

import numpy as np

FRAMES_KEY = "frames.npy"
CAPTION_KEY = "caption.txt"
META_KEY = "meta.json"
SCHEMA_VERSION = 1


class ShardFormatError(ValueError):
    pass


@dataclass(frozen=True)
class ClipMeta:
    duration: float  # seconds spanned from the first to the last frame: (frames - 1) / fps
    fps: float  # sampling rate of the stored frames
    stage: int  # 1 (sequential keyframes) or 2 (interpolation)
    source: str  # source video path or id
    clip_start: float  # seconds into the source
    clip_end: float
    num_frames: int
    schema: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Sample:
    key: str
    frames: np.ndarray  # int64 [frames, h, w]
    caption: str
    meta: ClipMeta


def encode_sample(key: str, frames: np.ndarray, caption: str, meta: ClipMeta) -> dict:
    """Sample -> WebDataset dict (bytes values) ready for `webdataset.TarWriter.write`."""
    if "." in key or "/" in key:
        raise ShardFormatError(f"sample key {key!r}: must not contain '.' or '/'")
    frames = np.asarray(frames)
    if frames.ndim != 3 or not np.issubdtype(frames.dtype, np.integer):
        raise ShardFormatError(
            f"sample {key}: frames must be an integer array [frames, h, w], got {frames.dtype}{list(frames.shape)}"
        )
    if frames.shape[0] != meta.num_frames:
        raise ShardFormatError(
            f"sample {key}: {frames.shape[0]} frames but meta.num_frames={meta.num_frames}"
        )
    if not caption.strip():
        raise ShardFormatError(f"sample {key}: empty caption")
    dtype = np.int16 if frames.max(initial=0) < 2**15 and frames.min(initial=0) >= 0 else np.int32
    buf = io.BytesIO()
    np.save(buf, frames.astype(dtype), allow_pickle=False)
    return {
        "__key__": key,
        FRAMES_KEY: buf.getvalue(),
        CAPTION_KEY: caption.encode("utf-8"),
        META_KEY: json.dumps(asdict(meta), ensure_ascii=False).encode("utf-8"),
    }


def decode_sample(raw: dict) -> Sample:
    """WebDataset dict (raw bytes, as read from a tar) -> Sample; errors name key and field."""
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')}: sample {key}"
    for field in (FRAMES_KEY, CAPTION_KEY, META_KEY):
        if field not in raw:
            raise ShardFormatError(f"{where}: missing field {field}")
    try:
        frames = np.load(io.BytesIO(raw[FRAMES_KEY]), allow_pickle=False).astype(np.int64)
    except Exception as err:
        raise ShardFormatError(f"{where}: field {FRAMES_KEY} is not a readable .npy array: {err}") from err
    try:
        caption = raw[CAPTION_KEY].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ShardFormatError(f"{where}: field {CAPTION_KEY} is not UTF-8") from err
    try:
        data = json.loads(raw[META_KEY])
        known = {f.name for f in fields(ClipMeta)}
        unknown = set(data) - known
        if unknown:
            raise ShardFormatError(f"{where}: field {META_KEY} has unknown keys {sorted(unknown)}")
        meta = ClipMeta(**data)
    except ShardFormatError:
        raise
    except Exception as err:
        raise ShardFormatError(f"{where}: field {META_KEY} is not valid ClipMeta JSON: {err}") from err
    if frames.ndim != 3 or frames.shape[0] != meta.num_frames:
        raise ShardFormatError(
            f"{where}: frames shape {list(frames.shape)} does not match meta.num_frames={meta.num_frames}"
        )
    return Sample(key=key, frames=frames, caption=caption, meta=meta)


def tar_problem(path: str) -> str | None:
    """Why a local shard file is not a complete tar archive, or None: random bytes are "not a
    tar archive" (the first 512-byte block is no tar header), a cut file is "truncated" (a tar
    ends with two zero blocks, in a size that is a multiple of 512)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(tarfile.BLOCKSIZE)
        if any(head):  # an all-zero first block is an empty archive's end marker
            try:
                tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                return f"not a tar archive: its first {tarfile.BLOCKSIZE} bytes are not a tar header"
        if size % tarfile.BLOCKSIZE or size < 2 * tarfile.BLOCKSIZE:
            return f"truncated: {size} bytes, not a whole number of {tarfile.BLOCKSIZE}-byte tar blocks"
        f.seek(size - 2 * tarfile.BLOCKSIZE)
        if any(f.read()):
            return "truncated: no end-of-archive marker (two zero blocks)"
    return None

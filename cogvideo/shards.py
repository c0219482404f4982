"""The shard schema: the one definition shared by data preparation (writer) and training (reader).

A WebDataset sample is a tar member group with the same `__key__`:

    {key}.{array}.npy  one or more named arrays, by the sample's kind (below)
    {key}.caption.txt  UTF-8 caption, without any duration prefix
    {key}.meta.json    ClipMeta as JSON; `kind` names the arrays the sample holds

Kinds (`KINDS`; a model family reads one, `ModelFamily.shard_kind`):

    tokens   frames.npy     integer [frames, h, w] image-token codes (int16, or int32 if needed)
             sr_frames.npy  optional: the same frames' codes on a finer grid (super-resolution)
    latents  latents.npy    floating [frames, channels, h, w] autoencoder latents
    frames   pixels.npy     uint8 [frames, height, width, 3] RGB frames

The duration prefix ("4.0秒<n>") is composed at load time from `meta.duration` by the text
format (`cogvideo.text_format`), so the format can change without re-preparing data; a still
(`meta.duration` null) gets none. Shards written before kinds were recorded (schema 1) hold
tokens.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

CAPTION_KEY = "caption.txt"
META_KEY = "meta.json"
SCHEMA_VERSION = 2


class ShardFormatError(ValueError):
    pass


def _integer(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.integer)


@dataclass(frozen=True)
class ArraySpec:
    name: str  # stored as {key}.{name}.npy
    ndim: int
    dtype_ok: Callable[[np.ndarray], bool]
    expected: str  # what dtype_ok accepts and the axes, for messages
    codes: bool = False  # token codes: stored in the narrowest integer type, read as int64

    @property
    def field(self) -> str:
        return f"{self.name}.npy"

    def problem(self, array: np.ndarray) -> str | None:
        if array.ndim != self.ndim or not self.dtype_ok(array):
            return f"{self.name} must be {self.expected}, got {array.dtype}{list(array.shape)}"
        return None


@dataclass(frozen=True)
class ShardKind:
    name: str
    arrays: tuple[ArraySpec, ...]  # every sample holds these
    optional: tuple[ArraySpec, ...] = ()

    def spec(self, array: str) -> ArraySpec | None:
        return next((s for s in self.arrays + self.optional if s.name == array), None)


TOKENS = ShardKind(
    "tokens",
    (ArraySpec("frames", 3, _integer, "an integer array [frames, h, w] of image-token codes", codes=True),),
    (
        ArraySpec(
            "sr_frames", 3, _integer, "an integer array [frames, H, W] of image-token codes", codes=True
        ),
    ),
)
LATENTS = ShardKind(
    "latents",
    (
        ArraySpec(
            "latents",
            4,
            lambda a: np.issubdtype(a.dtype, np.floating),
            "a floating array [frames, channels, h, w] of autoencoder latents",
        ),
    ),
)
FRAMES = ShardKind(
    "frames",
    (
        ArraySpec(
            "pixels", 4, lambda a: a.dtype == np.uint8 and a.shape[-1] == 3, "uint8 [frames, H, W, 3] RGB"
        ),
    ),
)
KINDS = {kind.name: kind for kind in (TOKENS, LATENTS, FRAMES)}


@dataclass(frozen=True)
class ClipMeta:
    # seconds spanned from the first to the last frame: (frames - 1) / fps; a first-frame sample
    # (cogvideo-reshard --first-frames) keeps the duration of the sample it opens; None: a still,
    # a frame that opens no clip (--stills), which a model reads with the caption alone
    duration: float | None
    fps: float  # sampling rate of the stored frames
    stage: int  # 1 (sequential keyframes) or 2 (interpolation)
    source: str  # source video path or id
    clip_start: float  # seconds into the source
    clip_end: float
    num_frames: int
    kind: str = TOKENS.name  # which arrays the sample holds (KINDS)
    schema: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Sample:
    key: str
    arrays: Mapping[str, np.ndarray]  # by name, as the kind lists them (token codes as int64)
    caption: str
    meta: ClipMeta


def _kind(name: str, where: str) -> ShardKind:
    if name not in KINDS:
        raise ShardFormatError(f"{where}: unknown sample kind {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def _stored(spec: ArraySpec, array: np.ndarray) -> np.ndarray:
    """Token codes in the narrowest integer type that holds them; other arrays as given."""
    if not spec.codes:
        return array
    fits_int16 = array.min(initial=0) >= 0 and array.max(initial=0) < 2**15
    return array.astype(np.int16 if fits_int16 else np.int32)


def encode_sample(key: str, arrays: Mapping[str, np.ndarray], caption: str, meta: ClipMeta) -> dict:
    """Sample -> WebDataset dict (bytes values) ready for `webdataset.TarWriter.write`."""
    if "." in key or "/" in key:
        raise ShardFormatError(f"sample key {key!r}: must not contain '.' or '/'")
    kind = _kind(meta.kind, f"sample {key}")
    missing = [spec.name for spec in kind.arrays if spec.name not in arrays]
    if missing:
        raise ShardFormatError(f"sample {key}: a {kind.name} sample needs arrays {missing}")
    if not caption.strip():
        raise ShardFormatError(f"sample {key}: empty caption")
    out = {"__key__": key}
    for name, array in arrays.items():
        spec, array = kind.spec(name), np.asarray(array)
        if spec is None:
            raise ShardFormatError(f"sample {key}: a {kind.name} sample has no array {name!r}")
        if problem := spec.problem(array):
            raise ShardFormatError(f"sample {key}: {problem}")
        if array.shape[0] != meta.num_frames:
            raise ShardFormatError(
                f"sample {key}: {name} has {array.shape[0]} frames but meta.num_frames={meta.num_frames}"
            )
        buf = io.BytesIO()
        np.save(buf, _stored(spec, array), allow_pickle=False)
        out[spec.field] = buf.getvalue()
    out[CAPTION_KEY] = caption.encode("utf-8")
    out[META_KEY] = json.dumps(asdict(meta), ensure_ascii=False).encode("utf-8")
    return out


def sample_fields(raw: Mapping) -> dict:
    """The stored fields of a raw WebDataset sample (arrays, caption, meta), without `__key__`/`__url__`."""
    return {name: value for name, value in raw.items() if not name.startswith("__")}


def decode_sample(raw: dict) -> Sample:
    """WebDataset dict (raw bytes, as read from a tar) -> Sample; errors name key and field."""
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')}: sample {key}"
    for field in (CAPTION_KEY, META_KEY):
        if field not in raw:
            raise ShardFormatError(f"{where}: missing field {field}")
    meta = _decode_meta(raw[META_KEY], where)
    kind = _kind(meta.kind, where)
    arrays = {}
    for spec in kind.arrays + kind.optional:
        if spec.field not in raw:
            if spec in kind.arrays:
                raise ShardFormatError(f"{where}: missing field {spec.field}")
            continue
        arrays[spec.name] = _decode_array(raw[spec.field], spec, meta, where)
    try:
        caption = raw[CAPTION_KEY].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ShardFormatError(f"{where}: field {CAPTION_KEY} is not UTF-8") from err
    return Sample(key=key, arrays=arrays, caption=caption, meta=meta)


def _decode_meta(data: bytes, where: str) -> ClipMeta:
    try:
        record = json.loads(data)
        unknown = set(record) - {f.name for f in fields(ClipMeta)}
        if unknown:
            raise ShardFormatError(f"{where}: field {META_KEY} has unknown keys {sorted(unknown)}")
        return ClipMeta(**record)
    except ShardFormatError:
        raise
    except Exception as err:
        raise ShardFormatError(f"{where}: field {META_KEY} is not valid ClipMeta JSON: {err}") from err


def _decode_array(data: bytes, spec: ArraySpec, meta: ClipMeta, where: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:
        raise ShardFormatError(f"{where}: field {spec.field} is not a readable .npy array: {err}") from err
    if problem := spec.problem(array):
        raise ShardFormatError(f"{where}: field {spec.field}: {problem}")
    if array.shape[0] != meta.num_frames:
        raise ShardFormatError(
            f"{where}: {spec.name} shape {list(array.shape)} does not match meta.num_frames={meta.num_frames}"
        )
    return array.astype(np.int64) if spec.codes else array


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

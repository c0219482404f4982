"""Inputs of a job: video paths from folders or globs, their captions, their content hashes."""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cogvideo.configio import ConfigError


class Rejected(Exception):
    """An input or clip that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


REASONS = {
    # the input as a whole
    "missing_caption": "no caption for this video in the captions file or a sidecar .txt",
    "empty_caption": "the caption is empty or only whitespace",
    "caption_not_utf8": "the caption is not valid UTF-8",
    "duplicate_path": "the same file was listed more than once",
    "missing_file": "the file does not exist (anymore)",
    "broken_link": "a symbolic link whose target does not exist",
    "unreadable_file": "the file cannot be read (permissions, I/O error)",
    "empty_file": "the file has zero bytes",
    "duplicate_content": "same bytes as another input (sha256)",
    "not_a_video": "no container format recognised, or a still image",
    "corrupt_container": "a known container format that cannot be opened (cut before its index?)",
    "truncated": "the file ends before the length its container lists",
    "no_video_stream": "the file has no video stream (audio only?)",
    "unreadable_codec": "no decoder for the video codec",
    "broken_timestamps": "no frame rate, frames sharing a timestamp, or a gap between frames longer than "
    "the longest sampling interval",
    "resolution_too_small": "a side is below min_side",
    "resolution_too_large": "a side is above max_side",
    "decode_error": "decoding failed part-way, or fewer frames than the container lists",
    "no_usable_clip": "every clip of the video was rejected",
    "unexpected_error": "any other exception while processing the video (see detail)",
    # one clip of a video
    "clip_shorter_than_min": "the clip is shorter than min_clip_s",
    "clip_too_short_for_frames": "no configured frame rate fits the sample's frames in the clip",
}


@dataclass(frozen=True)
class Caption:
    text: str | None  # None when `problem` is set
    problem: str | None = None  # a REASONS key
    detail: str = ""


def list_inputs(patterns: list[str], extensions: list[str]) -> list[str]:
    """Absolute paths, in order: a folder gives its files with a video extension (recursively,
    sorted), a glob or a file gives what it matches. Repeats are kept (they are rejected later)."""
    suffixes = {e.lower() for e in extensions}
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = [
                os.path.join(root, name)
                for root, _, names in os.walk(pattern)
                for name in names
                if os.path.splitext(name)[1].lower() in suffixes
            ]
        else:
            found = [p for p in glob.glob(pattern, recursive=True) if not os.path.isdir(p)]
            if not found:
                raise ConfigError(f"--input {pattern!r}: no such file, folder or matching glob")
        paths += sorted(os.path.abspath(p) for p in found)
    return paths


def _caption(raw: str, where: str) -> Caption:
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept as lone surrogates by surrogateescape
        return Caption(None, "caption_not_utf8", where)
    text = raw.strip()
    return Caption(text) if text else Caption(None, "empty_caption", where)


def load_captions(path: str | Path) -> dict[str, Caption]:
    """CSV with a `path,caption` header or JSONL with `path` and `caption` keys (other keys are
    ignored). Relative paths are relative to the captions file. Keyed by absolute real path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--captions {path}: file not found")
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise ConfigError(f"{path}: expected a header with columns path,caption; got {reader.fieldnames}")
        rows = [(f"{path}:{i + 2}", row) for i, row in enumerate(reader)]
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{i + 1}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{i + 1}: not valid JSON: {err}") from None
    else:
        raise ConfigError(f"--captions {path}: expected a .csv or .jsonl file")
    captions = {}
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or "caption" not in row:
            raise ConfigError(f"{where}: expected fields path and caption, got {row!r}")
        caption = row["caption"]
        captions[_real(path.parent / row["path"])] = (
            _caption(caption, where) if isinstance(caption, str) else Caption(None, "empty_caption", where)
        )
    return captions


def sidecar_caption(video: str) -> Caption:
    sidecar = Path(video).with_suffix(".txt")
    if not sidecar.is_file():
        return Caption(None, "missing_caption", f"no {sidecar.name} next to the video")
    return _caption(sidecar.read_bytes().decode("utf-8", errors="surrogateescape"), str(sidecar))


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


def caption_for(video: str, captions: dict[str, Caption] | None) -> Caption:
    if captions is None:
        return sidecar_caption(video)
    return captions.get(_real(video)) or Caption(None, "missing_caption", "not in the captions file")


def content_hash(path: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256 hex, size); Rejected for a missing or empty file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = 0
            while block := f.read(chunk):
                digest.update(block)
                size += len(block)
    except FileNotFoundError:
        if os.path.islink(path):
            raise Rejected(
                "broken_link",
                f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; "
                f"mount or restore the target, or drop the link",
            ) from None
        raise Rejected("missing_file", path) from None
    except OSError as err:
        raise Rejected("unreadable_file", f"{path}: {err}") from None
    if size == 0:
        raise Rejected("empty_file", path)
    return digest.hexdigest(), size

"""Inputs of a job: video paths from folders or globs, their captions, their content hashes.

Listing and captions files are read by the library's one reader of each (cogvideo.video_io,
cogvideo.captions); here they are matched: every caption row and every listed file is accounted
for (used, or rejected with its reason)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cogvideo.captions import CaptionRow, CaptionsFileError, caption_row, near_match, read_captions
from cogvideo.configio import ConfigError
from cogvideo.video_io import Listing, list_media


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
    "caption_too_long": "the caption is longer than any caption could be (a quote left open in the CSV?)",
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
    # rows of the captions file and files of the input folders that are no input (rewritten each run)
    "caption_without_video": "a captions row whose video is not among the inputs",
    "caption_superseded": "a captions row for a video that a later row captions again (the later is used)",
    "ignored_file": "a file in an input folder whose extension is not in prep.extensions",
}
LISTING_REASONS = ("caption_without_video", "caption_superseded", "ignored_file")


@dataclass
class Captions:
    """A captions file's rows by the real path of the video each names (the last row wins)."""

    file: Path
    by_video: dict[str, CaptionRow]
    superseded: list[CaptionRow]


def list_inputs(patterns: list[str], extensions: list[str], captions_file: str | None = None) -> Listing:
    """Absolute paths, in order: a folder gives its files with a video extension (recursively,
    sorted; its other files are counted as ignored, the captions file and sidecar captions aside),
    a glob or a file gives what it matches. Repeats are kept (they are rejected later)."""
    try:
        listing = list_media(patterns, extensions, skip=[captions_file] if captions_file else [])
    except FileNotFoundError as err:
        raise ConfigError(f"--input {err}") from None
    if captions_file is None:  # sidecar captions are no ignored files
        sidecars = {os.path.splitext(p)[0] + ".txt" for p in listing.files}
        listing = Listing(listing.files, [p for p in listing.ignored if p not in sidecars])
    return listing


def load_captions(path: str | Path) -> Captions:
    """CSV with a `path,caption` header or JSONL with `path` and `caption` keys (other keys are
    ignored). Relative paths are relative to the captions file. Keyed by absolute real path."""
    path = Path(path)
    try:
        rows = read_captions(path)
    except CaptionsFileError as err:
        raise ConfigError(f"--captions {err}") from None
    by_video, superseded = {}, []
    for row in rows:
        if not row.path:
            raise ConfigError(f"--captions {row.where}: the row gives no path")
        video = row.video(path.parent)
        if video in by_video:
            superseded.append(by_video[video])
        by_video[video] = row
    return Captions(path, by_video, superseded)


def sidecar_caption(video: str) -> CaptionRow:
    sidecar = Path(video).with_suffix(".txt")
    if not sidecar.is_file():
        return CaptionRow(str(sidecar), None, None, "missing_caption", f"no {sidecar.name} next to the video")
    return caption_row(str(sidecar), None, sidecar.read_bytes().decode("utf-8", errors="surrogateescape"))


def caption_for(video: str, captions: Captions | None) -> CaptionRow:
    if captions is None:
        return sidecar_caption(video)
    found = captions.by_video.get(os.path.realpath(video))
    if found is not None:
        return found
    return CaptionRow("", None, None, "missing_caption", f"not in {captions.file}")


def unmatched_rows(
    captions: Captions, listing: Listing, uncaptioned: list[str], earlier: Iterable[str] = ()
) -> list[dict]:
    """Rejected rows for what the listing and the captions leave unmatched: caption rows whose
    video is not an input of this run or of an `earlier` one (with the near match among uncaptioned
    inputs, or the reason it is not one), superseded rows, and ignored files."""
    inputs = {os.path.realpath(p) for p in [*listing.files, *earlier]}
    ignored = {os.path.realpath(p): p for p in listing.ignored}
    root = captions.file.parent
    rows = []
    for video, row in captions.by_video.items():
        if video in inputs:
            continue
        if video in ignored:
            why = f"{row.path} is in an input folder, but its extension is not in prep.extensions"
        elif os.path.exists(video):
            why = f"{row.path} exists but is not among the --input files"
        else:
            guess = near_match(row.path, [os.path.relpath(p, root) for p in uncaptioned])
            why = f"no file {row.path}" + (f"; did you mean {guess}?" if guess else "")
        rows.append(listing_row(row.where, video, "caption_without_video", f"{row.where}: {why}"))
    rows += [
        listing_row(
            r.where, r.video(root), "caption_superseded", f"{r.where}: a later row captions {r.path} again"
        )
        for r in captions.superseded
    ]
    return rows + ignored_rows(listing)


def ignored_rows(listing: Listing) -> list[dict]:
    return [
        listing_row(
            path,
            path,
            "ignored_file",
            f"{path}: {os.path.splitext(path)[1] or 'no'} extension, not a video's",
        )
        for path in listing.ignored
    ]


def listing_row(entry: str, source: str, reason: str, detail: str) -> dict:
    return {"entry": entry, "source": source, "clip": None, "reason": reason, "detail": detail}


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

"""Read and write videos as uint8 RGB arrays [T, H, W, 3] with PyAV: the one mp4 writer, the one
list of video file suffixes, the one listing of input folders and the one rule for a file that is
not a video (`open_video`) and the one square-frame filter (`square_graph`), which data
preparation, the image tokenizer fit and FVD share."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")  # what is read as video by default
# Leading bytes of container formats: a file that starts like one but does not open is corrupt
# (typically truncated), anything else is not a video at all.
_SIGNATURES = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"), (0, b"OggS"), (0, b"FLV"))


class VideoFileError(ValueError):
    """A file that cannot be read as a video; `reason` is one of data_prep.inputs.REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Listing:
    files: list[str]  # absolute paths, in order: each folder's files sorted, then each pattern's
    ignored: list[str] = field(default_factory=list)  # files of the folders with a suffix not read

    def ignored_by_suffix(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for path in self.ignored:
            suffix = os.path.splitext(path)[1].lower() or "(none)"
            counts[suffix] = counts.get(suffix, 0) + 1
        return dict(sorted(counts.items()))


def list_media(patterns: Iterable[str], suffixes: Iterable[str], skip: Iterable[str] = ()) -> Listing:
    """A folder gives its files whose suffix is in `suffixes` (recursively, sorted) and counts its
    other files as ignored (but those in `skip`: captions files); a glob or a file gives what it
    matches, whatever the suffix. Repeats are kept. FileNotFoundError names a pattern that matches
    nothing."""
    wanted = {s.lower() for s in suffixes}
    skipped = {os.path.realpath(p) for p in skip}
    files, ignored = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.abspath(os.path.join(root, name))
                for root, _, names in os.walk(pattern)
                for name in names
            )
            files += [p for p in found if os.path.splitext(p)[1].lower() in wanted]
            ignored += [
                p
                for p in found
                if os.path.splitext(p)[1].lower() not in wanted and os.path.realpath(p) not in skipped
            ]
            continue
        found = [p for p in glob.glob(pattern, recursive=True) if not os.path.isdir(p)]
        if not found:
            raise FileNotFoundError(f"{pattern!r}: no such file, folder or matching glob")
        files += sorted(os.path.abspath(p) for p in found)
    return Listing(files, ignored)


def _looks_like_container(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return any(head[at : at + len(magic)] == magic for at, magic in _SIGNATURES)


def open_video(path: str | Path) -> av.container.InputContainer:
    """The file opened with PyAV, or VideoFileError with the reason: missing_file,
    unreadable_file, not_a_video (no container format recognised, or a still image), or
    corrupt_container (a known container's leading bytes, but it does not open)."""
    path = str(path)
    try:
        container = av.open(path, metadata_errors="ignore")
    except FileNotFoundError:
        raise VideoFileError("missing_file", f"{path}: no such file") from None
    except PermissionError as err:
        raise VideoFileError("unreadable_file", f"{path}: {err.strerror}") from None
    except av.FFmpegError as err:
        reason = "corrupt_container" if _looks_like_container(path) else "not_a_video"
        what = "a video container that does not open" if reason == "corrupt_container" else "not a video"
        raise VideoFileError(reason, f"{path}: {what} ({err.strerror or err})") from None
    if container.format.name == "image2" or container.format.name.endswith("_pipe"):
        kind = container.format.long_name  # FFmpeg opens a still image as a one-frame "video"
        container.close()
        raise VideoFileError("not_a_video", f"{path}: an image ({kind}), not a video")
    return container


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """(frames uint8 [T, H, W, 3], fps) of the first video stream; VideoFileError (a ValueError)
    naming the file and the reason when it cannot be read."""
    frames = []
    with open_video(path) as container:
        if not container.streams.video:
            raise VideoFileError("no_video_stream", f"{path}: no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except av.FFmpegError as err:
            raise VideoFileError(
                "decode_error", f"{path}: decoding failed after {len(frames)} frames ({err})"
            ) from None
    if not frames:
        raise VideoFileError("decode_error", f"{path}: no decodable frames")
    return np.stack(frames), fps


def square_frames(path: str | Path, frame_size: int, max_frames: int | None = None) -> np.ndarray:
    """Frames of the file's first video stream as uint8 [T, S, S, 3], S = `frame_size`, filtered as
    data preparation filters them (`square_graph`: the centred crop square on screen, area-resized
    on the decoded planes and only then turned into RGB), so that nothing at the source's size is
    held but the decoder's own frames (threads split a frame's slices, not frames: one frame in
    flight per thread would be one source-sized frame each). VideoFileError (a ValueError) names
    the file and the reason it cannot be read."""
    frames: list[np.ndarray] = []
    with open_video(path) as container:
        if not container.streams.video:
            raise VideoFileError("no_video_stream", f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "SLICE"
        try:
            sar = Fraction(stream.sample_aspect_ratio or 1)
            crop = square_crop(stream.codec_context.width, stream.codec_context.height, sar)
            graph = square_graph(stream, crop, frame_size)
            for frame in container.decode(stream):
                graph.vpush(frame)
                frames += [f.to_ndarray() for f in pulled(graph)]
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except av.FFmpegError as err:
            raise VideoFileError(
                "decode_error", f"{path}: decoding failed after {len(frames)} frames ({err})"
            ) from None
    if not frames:
        raise VideoFileError("decode_error", f"{path}: no decodable frames")
    return np.stack(frames[:max_frames])


def square_crop(width: int, height: int, sar: Fraction) -> tuple[int, int]:
    """The centred crop (coded pixels) that is square on screen when pixels are `sar` wide."""
    side = min(width * sar, height)
    return min(width, round(side / sar)), min(height, round(side))


def square_graph(
    stream: av.video.stream.VideoStream, crop: tuple[int, int], frame_size: int, deinterlace: bool = False
) -> av.filter.Graph:
    """The FFmpeg filters every square frame of the project goes through, one C pass per frame:
    deinterlace (`deinterlace`: only frames flagged interlaced change, one frame out per frame in),
    the centred `crop` (width, height) on the decoded YUV planes, area-average resize to
    `frame_size`, RGB following the frames' colour range and matrix."""
    graph = av.filter.Graph()
    chain = [graph.add_buffer(template=stream)]
    if deinterlace:
        chain.append(graph.add("yadif", "mode=send_frame:parity=auto:deint=interlaced"))
    chain += [
        graph.add("crop", f"{crop[0]}:{crop[1]}"),
        graph.add("scale", f"{frame_size}:{frame_size}:flags=area"),
        graph.add("format", "rgb24"),
        graph.add("buffersink"),
    ]
    for source, target in zip(chain, chain[1:]):
        source.link_to(target)
    graph.configure()
    return graph


def pulled(graph: av.filter.Graph) -> Iterator[av.VideoFrame]:
    """The frames the graph has ready (after a `vpush`, or all that remain after `vpush(None)`)."""
    while True:
        try:
            yield graph.vpull()
        except (av.BlockingIOError, av.EOFError):
            return


def write_mp4(
    path: str | Path, frames: np.ndarray, fps: float, crf: int = 18, lossless: bool = False
) -> Path:
    """uint8 [T, H, W, 3] -> H.264 mp4 (MPEG-4 Part 2 when the build has no libx264).

    Lossy: yuv420p at `crf` (odd sides padded by repeating the edge). `lossless`: qp 0 in 4:4:4,
    so the exact colours come back (what an analyzer of synthetic videos needs), with one encoder
    thread so the same frames give the same bytes.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 [T, H, W, 3], got {frames.dtype}{list(frames.shape)}")
    height, width = frames.shape[1:3]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format="mp4") as container:
        if lossless:
            stream = container.add_stream("libx264", rate=rate, options={"qp": "0", "preset": "veryfast"})
            stream.pix_fmt = "yuv444p"
            stream.width, stream.height = width, height
            stream.codec_context.thread_count = 1
        else:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            stream = container.add_stream(
                codec, rate=rate, options={"crf": str(crf)} if codec == "libx264" else {}
            )
            stream.pix_fmt = "yuv420p"
            stream.width, stream.height = width + width % 2, height + height % 2
        for image in frames:
            if image.shape[:2] != (stream.height, stream.width):
                image = np.pad(
                    image, ((0, stream.height - height), (0, stream.width - width), (0, 0)), mode="edge"
                )
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24"))
            )
        container.mux(stream.encode())
    return Path(path)


def list_videos(directory: str | Path) -> Listing:
    """The videos of a folder (as `list_media` lists a folder: its other files counted as ignored),
    or the sampled mp4s of a `cogvideo-sample` output folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    manifest = directory / "manifest.json"
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text(encoding="utf-8")).get("entries")
        except (json.JSONDecodeError, AttributeError):
            entries = None
        if isinstance(entries, list):  # the sampler's manifest
            return Listing(
                [str(directory / e["key"] / e["files"]["mp4"]) for e in entries if e.get("status") == "ok"]
            )
    suffixes = VIDEO_SUFFIXES + (".gif",)  # the sampler's animated previews are videos here too
    listing = list_media([str(directory)], suffixes)
    if not listing.files:
        raise ValueError(f"{directory}: no videos ({', '.join(suffixes)})")
    return listing

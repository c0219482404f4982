"""Read and write videos as uint8 RGB arrays [T, H, W, 3] with PyAV: the one mp4 writer and the
one list of video file suffixes."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")  # what is read as video by default


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """(frames uint8 [T, H, W, 3], fps) of the first video stream."""
    frames = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"{path}: not a readable video ({err})") from err
    if not frames:
        raise ValueError(f"{path}: no decodable frames")
    return np.stack(frames), fps


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


def list_videos(directory: str | Path) -> list[Path]:
    """The videos of a folder, or the sampled mp4s of a `cogvideo-sample` output folder."""
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
            return [directory / e["key"] / e["files"]["mp4"] for e in entries if e.get("status") == "ok"]
    suffixes = VIDEO_SUFFIXES + (".gif",)  # the sampler's animated previews are videos here too
    videos = sorted(p for p in directory.iterdir() if p.suffix.lower() in suffixes)
    if not videos:
        raise ValueError(f"{directory}: no videos ({', '.join(suffixes)})")
    return videos

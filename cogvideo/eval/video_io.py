"""Read and write videos as uint8 RGB arrays [T, H, W, 3] with PyAV."""
from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


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


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """H.264 mp4 (yuv420p, so width and height must be even)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 [T, H, W, 3], got {frames.dtype}{list(frames.shape)}")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
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
    videos = sorted(p for p in directory.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ValueError(f"{directory}: no videos ({', '.join(VIDEO_SUFFIXES)})")
    return videos

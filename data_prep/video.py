"""One video: probe it, then one decode pass that cuts it into clips at scene changes and
keeps each clip's frames resized and centre-cropped to the model's frame size."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detector import FlashFilter
from scenedetect.detectors import ContentDetector

from data_prep.config import PrepConfig
from data_prep.inputs import Rejected

# Leading bytes of container formats: a file that starts like one but does not open is corrupt
# (typically truncated), anything else is not a video at all.
_SIGNATURES = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"), (0, b"OggS"), (0, b"FLV"))


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction
    num_frames: int
    codec: str

    @property
    def seconds(self) -> float:
        return self.num_frames / float(self.fps)


@dataclass
class Clip:
    index: int  # position among the video's clips
    first_frame: int  # index of its first frame in the video
    frames: np.ndarray  # uint8 [n, frame_size, frame_size, 3]


def _looks_like_container(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return any(head[at:at + len(magic)] == magic for at, magic in _SIGNATURES)


def _open(path: str) -> av.container.InputContainer:
    try:
        return av.open(path, metadata_errors="ignore")
    except FileNotFoundError:
        raise Rejected("missing_file", path) from None
    except av.FFmpegError as err:
        reason = "corrupt_container" if _looks_like_container(path) else "not_a_video"
        raise Rejected(reason, f"{path}: {err}") from None


def probe(path: str, cfg: PrepConfig) -> VideoInfo:
    """Size, rate and frame count from the container, frame-interval check from the packet
    timestamps (demuxing only, no decoding); Rejected with the reason otherwise."""
    with _open(path) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise Rejected("no_video_stream", f"{path}: streams: {', '.join(kinds)}")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None or ctx.codec is None or not ctx.codec.is_decoder:
            raise Rejected("unreadable_codec", f"{path}: no decoder for the codec of video stream {stream.index}")
        width, height, codec = ctx.width, ctx.height, ctx.codec.name
        if min(width, height) < cfg.min_side:
            raise Rejected("resolution_too_small", f"{path}: {width}x{height} < min_side={cfg.min_side}")
        if max(width, height) > cfg.max_side:
            raise Rejected("resolution_too_large", f"{path}: {width}x{height} > max_side={cfg.max_side}")
        fps = stream.average_rate or stream.guessed_rate
        if not fps:
            raise Rejected("variable_frame_rate", f"{path}: the container gives no frame rate")
        time_base, listed = float(stream.time_base), stream.frames
        try:
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None)
        except av.FFmpegError as err:
            raise Rejected("decode_error", f"{path}: {err}") from None
    if listed and len(pts) < listed:
        raise Rejected("truncated", f"{path}: the container lists {listed} frames, the file holds {len(pts)}")
    if len(pts) >= 2:
        intervals = np.diff(np.asarray(pts, np.float64)) * time_base
        worst = float(np.max(np.abs(intervals * float(fps) - 1)))
        if worst > cfg.vfr_tolerance:
            raise Rejected("variable_frame_rate", f"{path}: frame intervals from {intervals.min():.4f} s to "
                           f"{intervals.max():.4f} s at a nominal {float(fps):.3f} fps")
    return VideoInfo(width, height, Fraction(fps), max(listed, len(pts)), codec)


def _crop_and_resize(stream: av.video.stream.VideoStream, frame_size: int) -> av.filter.Graph:
    """FFmpeg filters: centre square crop (on the decoded YUV planes), area-average resize to
    `frame_size`, RGB; one C pass per frame."""
    graph = av.filter.Graph()
    side = min(stream.codec_context.width, stream.codec_context.height)
    chain = [graph.add_buffer(template=stream), graph.add("crop", f"{side}:{side}"),
             graph.add("scale", f"{frame_size}:{frame_size}:flags=area"), graph.add("format", "rgb24"),
             graph.add("buffersink")]
    for source, target in zip(chain, chain[1:]):
        source.link_to(target)
    graph.configure()
    return graph


def iter_clips(path: str, info: VideoInfo, cfg: PrepConfig, frame_size: int) -> Iterator[Clip]:
    """Decode every frame once: each is centre-cropped and resized to `frame_size`, fed to the scene
    detector, and kept until its clip closes (at a cut, at max_clip_s, or at the end)."""
    fps = float(info.fps)
    detector = ContentDetector(threshold=cfg.scene_threshold, min_scene_len=max(1, round(cfg.min_scene_s * fps)),
                               filter_mode=FlashFilter.Mode.SUPPRESS)  # cuts are reported on the frame itself
    max_frames = max(1, int(cfg.max_clip_s * fps) + 1)
    buffer: list[np.ndarray] = []
    first, index, decoded = 0, 0, 0
    with _open(path) as container:
        try:
            stream = container.streams.video[0]
            resize = _crop_and_resize(stream, frame_size)
            for frame in container.decode(stream):
                resize.vpush(frame)
                image = resize.vpull().to_ndarray()
                cut = detector.process_frame(FrameTimecode(decoded, fps), np.ascontiguousarray(image[..., ::-1]))
                if buffer and (cut or len(buffer) == max_frames):
                    yield Clip(index, first, np.stack(buffer))
                    buffer, first, index = [], decoded, index + 1
                buffer.append(image)
                decoded += 1
        except av.FFmpegError as err:
            raise Rejected("decode_error", f"{path}: after {decoded} frames: {err}") from None
    if decoded < info.num_frames:
        raise Rejected("decode_error", f"{path}: decoded {decoded} of {info.num_frames} frames (truncated?)")
    if buffer:
        yield Clip(index, first, np.stack(buffer))

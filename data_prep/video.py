"""One video: probe it, then one decode pass that cuts it into clips at scene changes and
keeps each clip's frames, as a player shows them, resized and centre-cropped to the model's
frame size, with their presentation times.

"As a player shows them": the display matrix (or the legacy `rotate` tag) is applied, a
square crop is square on screen (sample aspect ratio), interlaced frames are deinterlaced
(yadif), and the YUV -> RGB conversion follows the file's colour range and matrix."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator

import av
import numpy as np

from cogvideo.video_io import VideoFileError, open_video, pulled, square_crop, square_graph
from data_prep.config import PrepConfig
from data_prep.inputs import Rejected
from data_prep.rates import TIME_TOL
from data_prep.scenes import ContentCuts

# FFmpeg's names for AVColorRange and AVColorSpace values (libavutil/pixfmt.h)
_RANGES = {0: "unspecified", 1: "limited", 2: "full"}
_MATRICES = {
    0: "rgb",
    1: "bt709",
    2: "unspecified",
    4: "fcc",
    5: "bt601",
    6: "bt601",
    7: "smpte240m",
    8: "ycgco",
    9: "bt2020",
    10: "bt2020c",
}
_PROGRESSIVE = (0, 1)  # AVFieldOrder: unknown, progressive; the others are field orders
REORDER_DEPTH = 16  # frames: FFmpeg's largest decoder reorder delay (MAX_REORDER_DELAY)


@dataclass(frozen=True)
class Orientation:
    """How a player turns the decoded picture: `rotation` degrees clockwise (the `rotate` tag's
    convention), then mirrored left-right."""

    rotation: int = 0
    mirrored: bool = False

    @classmethod
    def from_display_matrix(cls, m: np.ndarray) -> Orientation:
        """FFmpeg's display matrix [a b u; c d v; x y w] (QuickTime's `tkhd` matrix) maps a pixel
        (x, y) to (a x + c y, b x + d y) on screen, y down; the angle is rounded to a multiple of 90."""
        a, b, c, d = (float(v) for v in (m[0], m[1], m[3], m[4]))
        mirrored = a * d - b * c < 0
        degrees = np.degrees(np.arctan2(b, -a if mirrored else a))
        return cls(int(round(degrees / 90)) % 4 * 90, bool(mirrored))

    def apply(self, image: np.ndarray) -> np.ndarray:
        image = np.rot90(image, -self.rotation // 90)
        return image[:, ::-1] if self.mirrored else image


@dataclass(frozen=True)
class VideoInfo:
    width: int  # coded size
    height: int
    fps: Fraction  # nominal (average) rate
    num_frames: int
    codec: str
    seconds: float = 0.0  # from the first frame's time to the end of the last frame
    stream: int = 0  # index of the video stream used
    sar: Fraction = Fraction(1)  # sample (pixel) aspect ratio
    orientation: Orientation = Orientation()
    interlaced: bool = False
    properties: dict = field(default_factory=dict)  # what the manifest and summary record


@dataclass
class Clip:
    index: int  # position among the video's clips
    first_frame: int  # index of its first frame in the video
    frames: np.ndarray  # uint8 [n, frame_size, frame_size, 3]
    times: np.ndarray  # float64 [n]: presentation time of each frame, s from the video's first frame


def _open(path: str) -> av.container.InputContainer:
    """The library's one rule for a file that is not a video (cogvideo.video_io.open_video)."""
    try:
        return open_video(path)
    except VideoFileError as err:
        raise Rejected(err.reason, err.detail) from None


def _video_stream(
    path: str, container: av.container.InputContainer
) -> tuple[av.video.stream.VideoStream, int]:
    """The default video stream (cover art excluded), else the first; and how many there are."""
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise Rejected("no_video_stream", f"{path}: streams: {', '.join(kinds)}")
    default = [s for s in videos if s.disposition & av.stream.Disposition.default]
    return (default or videos)[0], len(videos)


def _packets(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> tuple[list[int], av.VideoFrame | None]:
    """Presentation timestamps of every packet (demuxing only) and the first decoded frame,
    which carries what the container and codec say about the picture (side data, colour)."""
    pts, first, ctx = [], None, stream.codec_context
    for packet in container.demux(stream):
        if packet.pts is not None:
            pts.append(packet.pts)
        if first is None and packet.size:
            first = next(iter(ctx.decode(packet)), None)
    if first is None:
        first = next(iter(ctx.decode(None)), None)
    return pts, first


def _check_timestamps(
    path: str, pts: list[int], time_base: Fraction, fps: Fraction, listed_s: float, cfg: PrepConfig
) -> tuple[float, bool]:
    """(seconds the frames cover, variable rate?); Rejected when the timestamps are broken or the
    file ends before the length its container lists."""
    times = np.sort(np.asarray(pts, np.float64)) * float(time_base)
    intervals = np.diff(times)
    frame_s = float(1 / fps)
    if np.any(intervals < TIME_TOL):
        repeated = int(np.sum(intervals < TIME_TOL))
        at = times[1:][intervals < TIME_TOL][0] - times[0]
        raise Rejected(
            "broken_timestamps",
            f"{path}: {repeated} frame(s) repeat another's timestamp "
            f"(first at {at:.3f} s): their order cannot be repaired",
        )
    longest = 1 / min(cfg.stage1_fps + cfg.stage2_fps)
    if len(intervals) and intervals.max() > longest + TIME_TOL:
        gap = int(np.argmax(intervals))
        raise Rejected(
            "broken_timestamps",
            f"{path}: no frame for {intervals[gap]:.3f} s (from "
            f"{times[gap] - times[0]:.3f} s to {times[gap + 1] - times[0]:.3f} s), longer than "
            f"the longest sampling interval ({longest:g} s)",
        )
    covered = times[-1] - times[0] + frame_s  # the last frame is shown for one nominal frame
    if listed_s - covered > 2 * frame_s + TIME_TOL:
        raise Rejected(
            "truncated",
            f"{path}: the container lists {listed_s:.3f} s of video, the frames' "
            f"timestamps end at {covered:.3f} s ({len(pts)} frames)",
        )
    mean = (times[-1] - times[0]) / len(intervals) if len(intervals) else frame_s
    vfr = bool(len(intervals) and np.max(np.abs(intervals / mean - 1)) > cfg.vfr_tolerance)
    return covered, vfr


def _picture(first: av.VideoFrame, stream: av.video.stream.VideoStream) -> tuple[Orientation, str, str, bool]:
    """(orientation, colour range, colour matrix, interlaced) of a stream, from its first frame."""
    # looked up by type: PyAV 18.1.1 iterates side data by type (18.1.0 and earlier by entry)
    matrix = first.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    if matrix is not None:
        orientation = Orientation.from_display_matrix(np.frombuffer(bytes(matrix), np.int32))
    else:
        tag = {key.lower(): value for key, value in stream.metadata.items()}.get("rotate", "0")
        orientation = Orientation(int(tag) % 360 // 90 * 90) if tag.lstrip("-").isdigit() else Orientation()
    colour_range = (
        "full" if first.format.name.startswith("yuvj") else _RANGES.get(first.color_range, "unspecified")
    )
    interlaced = stream.codec_context.field_order not in _PROGRESSIVE or bool(first.interlaced_frame)
    return orientation, colour_range, _MATRICES.get(first.colorspace, "unspecified"), interlaced


def probe(path: str, cfg: PrepConfig) -> VideoInfo:
    """Size, rate, frame count and timestamps from the container (demuxing), the picture's
    orientation and colour from its first frame; Rejected with the reason otherwise."""
    with _open(path) as container:
        stream, video_streams = _video_stream(path, container)
        ctx = stream.codec_context
        if ctx is None or ctx.codec is None or not ctx.codec.is_decoder:
            raise Rejected(
                "unreadable_codec", f"{path}: no decoder for the codec of video stream {stream.index}"
            )
        width, height, codec = ctx.width, ctx.height, ctx.codec.name
        if min(width, height) < cfg.min_side:
            raise Rejected("resolution_too_small", f"{path}: {width}x{height} < min_side={cfg.min_side}")
        if max(width, height) > cfg.max_side:
            raise Rejected("resolution_too_large", f"{path}: {width}x{height} > max_side={cfg.max_side}")
        fps = stream.average_rate or stream.guessed_rate
        if not fps:
            raise Rejected("broken_timestamps", f"{path}: the container gives no frame rate")
        listed = stream.frames
        listed_s = max(
            float(stream.duration * stream.time_base) if stream.duration else 0.0, listed / float(fps)
        )
        try:
            pts, first = _packets(container, stream)
        except av.FFmpegError as err:
            raise Rejected("decode_error", f"{path}: {err}") from None
        if first is None:
            raise Rejected("decode_error", f"{path}: no frame of video stream {stream.index} decodes")
        seconds, vfr = (
            _check_timestamps(path, pts, stream.time_base, fps, listed_s, cfg)
            if pts
            else (listed / float(fps), False)
        )
        orientation, colour_range, matrix, interlaced = _picture(first, stream)
        sar, index = Fraction(stream.sample_aspect_ratio or 1), stream.index
    properties = {
        "stream": index,
        "video_streams": video_streams,
        "rotation": orientation.rotation,
        "mirrored": orientation.mirrored,
        "vfr": vfr,
        "sar": f"{sar.numerator}:{sar.denominator}",
        "range": colour_range,
        "matrix": matrix,
        "interlaced": interlaced,
    }
    return VideoInfo(
        width,
        height,
        Fraction(fps),
        len(pts) or listed,
        codec,
        float(seconds),
        index,
        sar,
        orientation,
        interlaced,
        properties,
    )


def _shown(
    container: av.container.InputContainer, info: VideoInfo, frame_size: int
) -> Iterator[av.VideoFrame]:
    """The video's frames through the filters, in presentation order."""
    stream = container.streams[info.stream]
    graph = square_graph(stream, square_crop(info.width, info.height, info.sar), frame_size, info.interlaced)
    for frame in container.decode(stream):
        graph.vpush(frame)
        yield from pulled(graph)
    graph.vpush(None)
    yield from pulled(graph)


def in_display_time(frames: Iterator[av.VideoFrame]) -> Iterator[tuple[av.VideoFrame, float | None]]:
    """Each frame, in the decoder's output order (display order), with the time it is shown: the
    frames' timestamps sorted within REORDER_DEPTH frames, as FFmpeg reorders timestamps of
    B-frames. A decoder that hands its packets' timestamps on in decode order (MPEG-4 Part 2 with
    "packed B-frames" in AVI: each B-frame stored with the frame after it) returns display-order
    frames whose timestamps are permuted within its reorder delay; players show them in order.
    Timestamps that are really broken (repeated, gaps, out of order beyond the delay) stay so."""
    pending: deque[av.VideoFrame] = deque()
    times: list[float] = []  # a heap of the pending frames' timestamps

    def oldest() -> tuple[av.VideoFrame, float | None]:
        frame = pending.popleft()
        return frame, None if frame.pts is None else heapq.heappop(times)

    for frame in frames:
        pending.append(frame)
        if frame.pts is not None:
            heapq.heappush(times, frame.time)
        if len(pending) > REORDER_DEPTH:
            yield oldest()
    while pending:
        yield oldest()


SCENE_CHUNK = 32  # frames scored for scene cuts together (data_prep.scenes)


class _ClipCutter:
    """Frames with their times in, clips out: a clip closes at a scene cut, past max_clip_s, or at
    the end. Frames are scored for cuts SCENE_CHUNK at a time, so a clip closes up to a chunk late."""

    def __init__(self, cfg: PrepConfig, fps: float):
        self.cuts = ContentCuts(cfg.scene_threshold, max(1, round(cfg.min_scene_s * fps)))
        self.max_clip_s = cfg.max_clip_s
        self.pending: list[tuple[np.ndarray, float]] = []
        self.buffer: list[np.ndarray] = []
        self.times: list[float] = []
        self.first = self.index = self.fed = 0

    def add(self, image: np.ndarray, time: float) -> Iterator[Clip]:
        self.pending.append((image, time))
        if len(self.pending) == SCENE_CHUNK:
            yield from self.flush()

    def flush(self) -> Iterator[Clip]:
        """Score the pending frames; the clips they close."""
        if not self.pending:
            return
        images, times = zip(*self.pending)
        self.pending = []
        for image, time, cut in zip(images, times, self.cuts.cuts(np.stack(images))):
            if self.buffer and (cut or time - self.times[0] > self.max_clip_s + TIME_TOL):
                yield self.clip()
                self.first, self.index = self.fed, self.index + 1
            self.buffer.append(image)
            self.times.append(time)
            self.fed += 1

    def clip(self) -> Clip:
        clip = Clip(self.index, self.first, np.stack(self.buffer), np.asarray(self.times))
        self.buffer, self.times = [], []
        return clip

    def finish(self) -> Iterator[Clip]:
        yield from self.flush()
        if self.buffer:
            yield self.clip()


def iter_clips(path: str, info: VideoInfo, cfg: PrepConfig, frame_size: int) -> Iterator[Clip]:
    """Decode every frame once: each is centre-cropped, resized to `frame_size` and turned as a
    player shows it, scored for scene cuts, and kept with its time until its clip closes (at a
    cut, at max_clip_s, or at the end)."""
    fps = float(info.fps)
    cutter = _ClipCutter(cfg, fps)
    decoded, origin, last = 0, None, -np.inf
    with _open(path) as container:
        try:
            for frame, shown_at in in_display_time(_shown(container, info, frame_size)):
                if shown_at is None:  # no timestamp: one nominal frame after the last
                    time = last + 1 / fps if decoded else 0.0
                else:
                    origin = shown_at if origin is None else origin
                    time = shown_at - origin
                if time <= last:
                    raise Rejected(
                        "broken_timestamps",
                        f"{path}: frame {decoded} is shown at {time:.3f} s, "
                        f"not after the frame before it ({last:.3f} s)",
                    )
                image = np.ascontiguousarray(info.orientation.apply(frame.to_ndarray()))
                yield from cutter.add(image, time)
                decoded, last = decoded + 1, time
        except av.FFmpegError as err:
            raise Rejected("decode_error", f"{path}: after {decoded} frames: {err}") from None
    if decoded < info.num_frames:
        raise Rejected("decode_error", f"{path}: decoded {decoded} of {info.num_frames} frames (truncated?)")
    yield from cutter.finish()

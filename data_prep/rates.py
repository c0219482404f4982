"""CogVideo's frame-rate rule and the frames it picks from a clip.

A sample of `n` frames at `fps` spans (n - 1) / fps seconds. A clip of `c` source frames at
`source_fps` offers (c - 1) / source_fps seconds between its first and last frame.
"""
from __future__ import annotations

import numpy as np

# Clip spans are ratios of integers; a sample that fits exactly must not be lost to rounding.
REL_TOL = 1e-9


def sample_span_s(num_frames: int, fps: float) -> float:
    return (num_frames - 1) / fps


def fits(num_frames: int, fps: float, clip_span_s: float, source_fps: float) -> bool:
    """The frames fit in the clip, and the rate does not exceed the source's (no repeated frames)."""
    return (sample_span_s(num_frames, fps) <= clip_span_s * (1 + REL_TOL)
            and fps <= source_fps * (1 + REL_TOL))


def stage1_rate(clip_span_s: float, num_frames: int, rates: list[float], source_fps: float) -> float | None:
    """The lowest rate in `rates` whose frames fit in the clip; None when none does."""
    for fps in sorted(rates):
        if fits(num_frames, fps, clip_span_s, source_fps):
            return fps
    return None


def stage2_rates(clip_span_s: float, num_frames: int, rates: list[float], source_fps: float) -> list[float]:
    """Every interpolation rate whose frames fit in the clip."""
    return [fps for fps in sorted(rates) if fits(num_frames, fps, clip_span_s, source_fps)]


def plan_samples(clip_frames: int, source_fps: float, num_frames: int, stages: list[int],
                 stage1_fps: list[float], stage2_fps: list[float]) -> list[tuple[int, float]]:
    """(stage, fps) of every sample a clip of `clip_frames` source frames yields."""
    span = (clip_frames - 1) / source_fps
    plan = []
    if 1 in stages:
        fps = stage1_rate(span, num_frames, stage1_fps, source_fps)
        if fps is not None:
            plan.append((1, fps))
    if 2 in stages:
        plan += [(2, fps) for fps in stage2_rates(span, num_frames, stage2_fps, source_fps)]
    return plan


def frame_indices(clip_frames: int, source_fps: float, fps: float, num_frames: int) -> np.ndarray:
    """Indices (into the clip) of `num_frames` frames `1 / fps` apart with the span centred in the
    clip: the first is the frame nearest the centred start, then the frames nearest to it plus
    k / fps, so a sample is described exactly by its first frame's time and its rate."""
    step = source_fps / fps
    first = (clip_frames - 1 - step * (num_frames - 1)) / 2
    if first < -REL_TOL * clip_frames:
        raise ValueError(f"{num_frames} frames at {fps} fps do not fit in {clip_frames} frames at {source_fps} fps")
    # floor(x + 0.5): nearest, ties to the later frame, so an exact fit lands on the first and last frame
    offsets = np.floor(step * np.arange(num_frames) + 0.5 + REL_TOL).astype(np.int64)
    start = min(int(np.floor(max(first, 0) + 0.5 + REL_TOL)), clip_frames - 1 - int(offsets[-1]))
    return start + offsets

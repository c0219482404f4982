"""CogVideo's frame-rate rule and the frames it picks from a clip, by presentation time.

A sample of `n` frames at `fps` spans (n - 1) / fps seconds. A clip offers the seconds between
its first and last frame's presentation times, and rates up to `source_fps`: its frame rate,
or for a variable-rate clip the rate of its longest frame interval, so that no sample has to
show one frame twice.
"""

from __future__ import annotations

import numpy as np

# Clip spans are ratios of integers; a sample that fits exactly must not be lost to rounding.
REL_TOL = 1e-9
TIME_TOL = 1e-6  # seconds: timestamps are never finer than a microsecond


def sample_span_s(num_frames: int, fps: float) -> float:
    return (num_frames - 1) / fps


def fits(num_frames: int, fps: float, clip_span_s: float, source_fps: float) -> bool:
    """The frames fit in the clip, and the rate does not exceed the source's (no repeated frames)."""
    return sample_span_s(num_frames, fps) <= clip_span_s * (1 + REL_TOL) and fps <= source_fps * (1 + REL_TOL)


def stage1_rate(clip_span_s: float, num_frames: int, rates: list[float], source_fps: float) -> float | None:
    """The lowest rate in `rates` whose frames fit in the clip; None when none does."""
    for fps in sorted(rates):
        if fits(num_frames, fps, clip_span_s, source_fps):
            return fps
    return None


def stage2_rates(clip_span_s: float, num_frames: int, rates: list[float], source_fps: float) -> list[float]:
    """Every interpolation rate whose frames fit in the clip."""
    return [fps for fps in sorted(rates) if fits(num_frames, fps, clip_span_s, source_fps)]


def source_rate(times: np.ndarray, vfr_tolerance: float) -> float:
    """The highest sampling rate a clip with frames at `times` (s) serves without repeating a
    frame: its mean rate when every interval is within `vfr_tolerance` of the mean, else the
    rate of its longest interval."""
    if len(times) < 2:
        return np.inf
    intervals = np.diff(times)
    mean = (times[-1] - times[0]) / len(intervals)
    return 1 / mean if np.max(np.abs(intervals / mean - 1)) <= vfr_tolerance else 1 / intervals.max()


def plan_samples(
    clip_span_s: float,
    source_fps: float,
    num_frames: int,
    stages: list[int],
    stage1_fps: list[float],
    stage2_fps: list[float],
) -> list[tuple[int, float]]:
    """(stage, fps) of every sample a clip of `clip_span_s` seconds (first to last frame) yields."""
    plan = []
    if 1 in stages:
        fps = stage1_rate(clip_span_s, num_frames, stage1_fps, source_fps)
        if fps is not None:
            plan.append((1, fps))
    if 2 in stages:
        plan += [(2, fps) for fps in stage2_rates(clip_span_s, num_frames, stage2_fps, source_fps)]
    return plan


def _nearest(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame nearest each target time, ties to the later frame."""
    after = np.clip(np.searchsorted(times, targets - TIME_TOL), 1, len(times) - 1)
    earlier = targets - times[after - 1] < times[after] - targets - TIME_TOL
    return np.where(earlier, after - 1, after) if len(times) > 1 else np.zeros(len(targets), np.int64)


def frames_at(times: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
    """Indices (into the clip) of `num_frames` frames `1 / fps` apart with the span centred in the
    clip: the first is the frame nearest the centred start, then the frames nearest to its time
    plus k / fps, so a sample is described exactly by its first frame's time and its rate."""
    span = sample_span_s(num_frames, fps)
    slack = times[-1] - times[0] - span
    if slack < -REL_TOL * max(span, 1.0):
        raise ValueError(
            f"{num_frames} frames at {fps} fps do not fit in a clip of {times[-1] - times[0]:.6f} s"
        )
    first = int(_nearest(times, np.array([times[0] + max(slack, 0) / 2]))[0])
    # the last frame must still be in the clip: move the start earlier if rounding overshot
    first = min(first, int(np.searchsorted(times, times[-1] - span + TIME_TOL, side="right")) - 1)
    return _nearest(times, times[first] + np.arange(num_frames) / fps)

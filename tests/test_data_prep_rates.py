"""CogVideo's frame-rate rule at and around every boundary, against a brute-force reference."""

from fractions import Fraction

import numpy as np
import pytest

from data_prep.config import PrepConfig
from data_prep.rates import frames_at, plan_samples, source_rate, stage1_rate, stage2_rates

RATES = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
INTERP = [2.0, 4.0, 8.0]


def reference_fits(num_frames, fps, clip_frames, source_fps):
    """Exact rational arithmetic: frames i * source_fps / fps (i < num_frames) all inside the clip."""
    step = Fraction(source_fps).limit_denominator(10**6) / Fraction(fps).limit_denominator(10**6)
    return step * (num_frames - 1) <= clip_frames - 1 and step >= 1


def boundary_clip_lengths(num_frames, source_fps):
    """Clip lengths (in source frames) at, just below and just above every rate's boundary."""
    lengths = set()
    for fps in RATES + INTERP:
        exact = (num_frames - 1) * source_fps / fps + 1
        lengths.update(
            {int(np.floor(exact)) - 1, int(np.floor(exact)), int(np.ceil(exact)), int(np.ceil(exact)) + 1}
        )
    return sorted(n for n in lengths if n >= 1)


@pytest.mark.parametrize("source_fps", [8.0, 24.0, 25.0, 30.0, 30000 / 1001])
@pytest.mark.parametrize("num_frames", [5, 9])
def test_stage1_takes_the_lowest_fitting_rate_and_stage2_every_fitting_rate(source_fps, num_frames):
    for clip_frames in boundary_clip_lengths(num_frames, source_fps):
        span = (clip_frames - 1) / source_fps
        fitting = [r for r in RATES if reference_fits(num_frames, r, clip_frames, source_fps)]
        assert stage1_rate(span, num_frames, RATES, source_fps) == (min(fitting) if fitting else None), (
            clip_frames
        )
        assert stage2_rates(span, num_frames, INTERP, source_fps) == [
            r for r in INTERP if reference_fits(num_frames, r, clip_frames, source_fps)
        ]


def test_exact_boundaries_fit_and_one_frame_less_does_not():
    # 5 frames at 1 fps from a 30 fps clip need frames 0..120: 121 frames fit, 120 do not
    assert stage1_rate(120 / 30, 5, RATES, 30.0) == 1.0
    assert stage1_rate(119 / 30, 5, RATES, 30.0) == 2.0
    assert stage1_rate(0.5, 5, RATES, 30.0) == 8.0
    assert stage1_rate(0.49, 5, RATES, 30.0) is None
    # a rate above the source's would repeat frames
    assert stage1_rate(10.0, 5, [16.0], 8.0) is None


def test_plan_samples_follows_the_configured_stages():
    cfg = PrepConfig()
    assert plan_samples(120 / 30, 30.0, 5, [1, 2], cfg.stage1_fps, cfg.stage2_fps) == [
        (1, 1.0),
        (2, 2.0),
        (2, 4.0),
        (2, 8.0),
    ]
    assert plan_samples(120 / 30, 30.0, 5, [2], cfg.stage1_fps, cfg.stage2_fps) == [
        (2, 2.0),
        (2, 4.0),
        (2, 8.0),
    ]
    assert plan_samples(9 / 30, 30.0, 5, [1, 2], cfg.stage1_fps, cfg.stage2_fps) == []
    # a variable-rate clip serves rates up to that of its longest frame interval (0.25 s)
    assert plan_samples(120 / 30, 4.0, 5, [1, 2], cfg.stage1_fps, cfg.stage2_fps) == [
        (1, 1.0),
        (2, 2.0),
        (2, 4.0),
    ]


@pytest.mark.parametrize("source_fps", [8.0, 25.0, 30000 / 1001])
def test_frames_at_constant_rate_are_evenly_spaced_centred_and_inside(source_fps):
    for fps in RATES + INTERP:
        for clip_frames in boundary_clip_lengths(5, source_fps):
            if not reference_fits(5, fps, clip_frames, source_fps):
                continue
            idx = frames_at(np.arange(clip_frames) / source_fps, fps, 5)
            assert idx[0] >= 0 and idx[-1] <= clip_frames - 1 and np.all(np.diff(idx) > 0)
            # the first frame is nearest the centred start, the others nearest to it + k / fps
            step = source_fps / fps
            assert abs(idx[0] - (clip_frames - 1 - 4 * step) / 2) <= 1
            assert np.all(np.abs(idx - idx[0] - step * np.arange(5)) <= 0.5 + 1e-9)
            assert abs((idx[0] + idx[-1]) / 2 - (clip_frames - 1) / 2) <= 1  # centred
    assert frames_at(np.arange(33) / 8.0, 1.0, 5).tolist() == [0, 8, 16, 24, 32]  # exact fit spans the clip


def test_frames_at_variable_rate_are_the_frames_nearest_the_true_times():
    rng = np.random.default_rng(0)
    intervals = np.where(rng.random(200) < 0.5, 0.016, 0.25)  # a phone's bursts
    times = np.concatenate([[0.0], np.cumsum(intervals)])
    assert source_rate(times, 0.25) == pytest.approx(4.0)
    assert source_rate(np.arange(100) / 30, 0.25) == pytest.approx(30.0)
    for fps in RATES:
        if 4 / fps > times[-1]:
            continue
        idx = frames_at(times, fps, 5)
        targets = times[idx[0]] + np.arange(5) / fps
        # brute force: the nearest frame to each target, ties to the later one
        expected = [max(range(len(times)), key=lambda i: (-round(abs(times[i] - t), 9), i)) for t in targets]
        assert idx.tolist() == expected
        assert abs(times[idx[0]] - (times[-1] - 4 / fps) / 2) <= 0.25  # centred to within one interval

"""cogvideo/eval/sr.py against hand-computed values."""

import numpy as np
import pytest

from cogvideo.eval.sr import flicker, sr_quality, upsample_bicubic


def test_flicker_is_the_mean_step_between_frames():
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    frames[1] += 6
    frames[2] += 9  # steps of 6 then 3 everywhere
    assert flicker(frames) == pytest.approx(4.5)
    assert flicker(frames[:1]) == 0.0


def test_bicubic_keeps_a_flat_frame_flat():
    frames = np.full((2, 4, 4, 3), 77, np.uint8)
    up = upsample_bicubic(frames, 12)
    assert up.shape == (2, 12, 12, 3) and (up == 77).all()


def test_sr_and_bicubic_are_scored_on_the_same_frames():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    low = np.full((2, 8, 8, 3), 128, np.uint8)
    sr = reference.copy()
    sr[0, 0, 0, 0] ^= 1  # one level off in one pixel of frame 0: MSE 1/(24*24*3)
    quality = sr_quality(reference, sr, low)
    assert np.isinf(quality["sr"]["psnr_db"])  # frame 1 is exact: its PSNR, and so the mean, is inf
    one_off = sr_quality(reference[:1], sr[:1], low[:1])["sr"]["psnr_db"]
    assert one_off == pytest.approx(10 * np.log10(255**2 * 24 * 24 * 3))  # MSE 1 / (24 * 24 * 3)
    flat = np.full_like(reference, 128)
    mse = ((reference.astype(float) - 128) ** 2).mean(axis=(1, 2, 3))
    assert quality["bicubic"]["psnr_db"] == pytest.approx(float(np.mean(10 * np.log10(255**2 / mse))))
    assert quality["bicubic"]["ssim"] < 0.1 < quality["sr"]["ssim"]
    with pytest.raises(ValueError, match="must hold the same frames"):
        sr_quality(reference, sr[:1], low)
    assert sr_quality(reference, flat, low)["sr"] == quality["bicubic"]

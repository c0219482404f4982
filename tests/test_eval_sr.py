"""cogvideo/eval/sr.py against hand-computed values."""

import numpy as np
import pytest

from cogvideo.eval.sr import flicker, sr_quality, tokenizer_ceiling, upsample_bicubic
from cogvideo.metrics import ssim_per_frame


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


class _EvenLevels:
    """A tokenizer stand-in whose round trip rounds every value down to an even level."""

    def encode(self, frames):
        return np.asarray(frames) // 2

    def decode(self, codes):
        return (np.asarray(codes) * 2).astype(np.uint8)


def test_the_tokenizer_ceiling_is_its_round_trip_of_the_reference():
    reference = np.full((3, 12, 12, 3), 40, np.uint8)  # frame 0 unchanged by the round trip
    reference[1, 0, 0, 0] = 41  # one level off in one value: MSE 1 / 432
    reference[2] = 41  # one level off everywhere: MSE 1
    ceiling = tokenizer_ceiling(reference, _EvenLevels())
    assert ceiling["unchanged_frames"] == 1
    assert ceiling["psnr_db"] == pytest.approx((10 * np.log10(255**2 * 432) + 10 * np.log10(255**2)) / 2)
    rebuilt = reference // 2 * 2
    assert ceiling["ssim"] == pytest.approx(float(ssim_per_frame(reference, rebuilt).mean()), rel=1e-12)
    assert tokenizer_ceiling(reference[:1], _EvenLevels())["psnr_db"] == np.inf  # no changed frame

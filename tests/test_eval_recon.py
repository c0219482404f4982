import numpy as np
import pytest

from cogvideo.metrics import K1, K2, gaussian_window, psnr, psnr_per_frame, ssim_per_frame


def test_psnr_of_known_mse():
    ref = np.full((2, 8, 8, 3), 100, np.uint8)
    rec = ref.copy()
    rec[0] += 5  # MSE 25
    rec[1, :4] += 10  # half the pixels off by 10: MSE 50
    np.testing.assert_allclose(
        psnr_per_frame(ref, rec), [10 * np.log10(255**2 / 25), 10 * np.log10(255**2 / 50)]
    )
    assert np.isinf(psnr_per_frame(ref, ref)).all()
    # over all pixels at once: MSE (25 + 50) / 2
    assert psnr(ref, rec) == pytest.approx(10 * np.log10(255**2 / 37.5))
    assert psnr(ref, ref) == float("inf")


def test_ssim_identity_and_constant_images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 16, 20, 3), dtype=np.uint8)
    np.testing.assert_allclose(ssim_per_frame(x, x), 1.0, atol=1e-12)
    a, b = np.full((1, 16, 16, 3), 50, np.uint8), np.full((1, 16, 16, 3), 120, np.uint8)
    c1 = (K1 * 255) ** 2  # zero variance: SSIM = luminance term (2ab + C1) / (a^2 + b^2 + C1)
    np.testing.assert_allclose(ssim_per_frame(a, b), (2 * 50 * 120 + c1) / (50**2 + 120**2 + c1))
    assert ssim_per_frame(x, (x // 2 + 60).astype(np.uint8))[0] < 0.9


def test_ssim_matches_direct_sum_over_windows():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (1, 13, 12, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    w2 = np.outer(gaussian_window(), gaussian_window())
    c1, c2 = (K1 * 255) ** 2, (K2 * 255) ** 2
    values = []
    for y in range(13 - 10):
        for x in range(12 - 10):
            for ch in range(3):
                pa, pb = (
                    a[0, y : y + 11, x : x + 11, ch].astype(float),
                    b[0, y : y + 11, x : x + 11, ch].astype(float),
                )
                ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
                va, vb = (w2 * (pa - ma) ** 2).sum(), (w2 * (pb - mb) ** 2).sum()
                cov = (w2 * (pa - ma) * (pb - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    np.testing.assert_allclose(ssim_per_frame(a, b), [np.mean(values)], rtol=1e-10)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="two \\[T, H, W, 3\\] videos"):
        psnr_per_frame(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 9, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_per_frame(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))

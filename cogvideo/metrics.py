"""Per-frame PSNR and SSIM for tokenizer reconstructions (uint8 RGB, data range 255).

SSIM is Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, computed
per channel over the 'valid' window positions and averaged over channels and positions.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import correlate1d

DATA_RANGE = 255.0
WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def _check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(
            f"reconstruction metrics need two [T, H, W, 3] videos of one shape, got {a.shape} and {b.shape}"
        )
    return a.astype(np.float64), b.astype(np.float64)


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """dB over all pixels of all frames at once (what a tokenizer fit reports); inf if equal."""
    a, b = _check(reference, reconstruction)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(DATA_RANGE**2 / mse))


def psnr_per_frame(reference: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """[T] dB; identical frames give inf."""
    a, b = _check(reference, reconstruction)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(DATA_RANGE**2 / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter_valid(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable window over H and W of [T, H, W, C], keeping positions where it fits."""
    half = len(window) // 2
    for axis in (1, 2):
        x = correlate1d(x, window, axis=axis, mode="constant")
    return x[:, half : x.shape[1] - half, half : x.shape[2] - half]


def ssim_per_frame(reference: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    a, b = _check(reference, reconstruction)
    if min(a.shape[1:3]) < WINDOW:
        raise ValueError(f"SSIM needs frames of at least {WINDOW}x{WINDOW} pixels, got {a.shape[1:3]}")
    w = gaussian_window()
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a**2
    var_b = _filter_valid(b * b, w) - mu_b**2
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(axis=(1, 2, 3))


def reconstruction_report(reference: np.ndarray, reconstruction: np.ndarray) -> dict:
    psnr, ssim = psnr_per_frame(reference, reconstruction), ssim_per_frame(reference, reconstruction)
    return {
        "frames": len(psnr),
        "psnr_db": psnr.tolist(),
        "ssim": ssim.tolist(),
        "mean_psnr_db": float(psnr.mean()),
        "mean_ssim": float(ssim.mean()),
        "protocol": f"uint8 RGB, data range 255; SSIM Gaussian {WINDOW}x{WINDOW} sigma {SIGMA}, K1 {K1}, K2 {K2}, "
        "per channel, valid positions",
    }

"""Super-resolution quality (the demo's DSR figures): the SR frames and a bicubic upsampling of
the same low-res frames, both against the rendered high-res reference, and frame-to-frame flicker.

    quality = sr_quality(reference, sr, low)   # {"sr": {psnr_db, ssim}, "bicubic": {...}}
    flicker(sr), flicker(upsample_bicubic(low, side))
    reference = scene_reference(low, scale, radius)   # the synthetic world's frames low shows, finer
    tokenizer_ceiling(reference, high_tokenizer)   # the best SR through that tokenizer's codes

PSNR and SSIM are cogvideo/metrics.py's (uint8 RGB, per frame, averaged over frames). Flicker is
the mean absolute difference of consecutive frames in uint8 levels: DSR samples each frame alone,
so whatever it adds over the low-res video's own change between frames (measured on its bicubic
upsampling, at the same scale) is flicker.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cogvideo.eval.prompts import classify_shape, largest_object, nearest_colour
from cogvideo.metrics import psnr_per_frame, ssim_per_frame
from cogvideo.synthetic import BACKGROUND, COLOURS, shape_mask


def upsample_bicubic(frames: np.ndarray, side: int) -> np.ndarray:
    """uint8 [T, h, w, 3] -> [T, side, side, 3], PIL's bicubic filter frame by frame."""
    frames = np.asarray(frames, dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(f).resize((side, side), Image.BICUBIC)) for f in frames])


def _scores(reference: np.ndarray, frames: np.ndarray) -> dict:
    return {
        "psnr_db": float(psnr_per_frame(reference, frames).mean()),
        "ssim": float(ssim_per_frame(reference, frames).mean()),
    }


def sr_quality(reference: np.ndarray, sr: np.ndarray, low: np.ndarray) -> dict:
    """Mean per-frame PSNR / SSIM of the SR frames and of the bicubic upsampling of `low` (the
    frames SR was given, decoded), both against `reference` [T, H, W, 3]."""
    reference = np.asarray(reference)
    if len(low) != len(reference) or np.shape(sr) != reference.shape:
        raise ValueError(
            f"sr_quality: reference {list(reference.shape)}, sr {list(np.shape(sr))} and low "
            f"{list(np.shape(low))} must hold the same frames"
        )
    bicubic = upsample_bicubic(low, reference.shape[1])
    return {"sr": _scores(reference, sr), "bicubic": _scores(reference, bicubic)}


def tokenizer_ceiling(reference: np.ndarray, tokenizer) -> dict:
    """The image tokenizer's own round trip of the reference (encoded at its grid, decoded) scored
    against it: SR that writes this tokenizer's codes can at best reach these figures. PSNR is the
    mean over the frames the round trip changes (an unchanged frame's PSNR is inf), with the count
    of unchanged frames beside it; SSIM is the mean over all frames."""
    reference = np.asarray(reference, dtype=np.uint8)
    rebuilt = np.asarray(tokenizer.decode(tokenizer.encode(reference)), dtype=np.uint8)
    psnr = psnr_per_frame(reference, rebuilt)
    changed = np.isfinite(psnr)
    return {
        "psnr_db": float(psnr[changed].mean()) if changed.any() else float("inf"),
        "ssim": float(ssim_per_frame(reference, rebuilt).mean()),
        "unchanged_frames": int((~changed).sum()),
    }


def flicker(frames: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames (uint8 levels; 0 for one frame)."""
    frames = np.asarray(frames, dtype=np.float64)
    if len(frames) < 2:
        return 0.0
    return float(np.abs(np.diff(frames, axis=0)).mean())


def scene_reference(low: np.ndarray, scale: int, radius: float) -> np.ndarray:
    """The synthetic world's rendering, `scale` times finer, of what each low-res frame shows:
    its object (the prompt analyzer's largest object: nearest palette colour, best-fitting shape)
    at its bounding box's centre with the world's `radius` (cogvideo.synthetic draws every shape
    in a box of side 2 * radius about its centre); a frame without one is the background.
    uint8 [T, h, w, 3] -> [T, h * scale, w * scale, 3]. A generated video has no other
    high-res truth: this is the scene it depicts, drawn exactly at the high resolution."""
    low = np.asarray(low, dtype=np.uint8)
    if low.ndim != 4 or low.shape[1] != low.shape[2]:
        raise ValueError(f"scene_reference: expected square [T, h, h, 3] frames, got {list(low.shape)}")
    out = np.empty((len(low), low.shape[1] * scale, low.shape[2] * scale, 3), np.uint8)
    out[:] = BACKGROUND
    for frame, target in zip(low, out):
        mask = largest_object(frame)
        if mask is None:
            continue
        ys, xs = np.nonzero(mask)
        centre = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
        drawn = shape_mask(classify_shape(mask), centre, radius, low.shape[1], scale)
        target[drawn] = COLOURS[nearest_colour(frame[mask])]
    return out

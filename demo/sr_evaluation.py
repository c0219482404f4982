"""The demo's super-resolution figures (a stage family with `evaluation: super_resolution`): the
held-out videos super-resolved by the stage against the high-res rendering of the scene each
low-res frame shows (cogvideo.eval.sr.scene_reference), next to a bicubic upsampling of the same
low-res frames, in the same run, and the ceiling of SR through the demo's image tokenizer (its own
round trip of the reference); frame-to-frame flicker of the SR video, of the low-res video
(bicubic, at the same scale) and of the reference; the prompt scores of the low-res and the SR
videos (SR must not change what the video shows); and whether the low-res videos are the
hierarchy's own samples (the stage's sampling reran the hierarchy with the same seeds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cogvideo.eval.prompts import score
from cogvideo.eval.sr import flicker, scene_reference, sr_quality, tokenizer_ceiling, upsample_bicubic
from demo.evaluation import analyze_keyframes, manifest_entries, video_frames

ATTRIBUTES = ("colour", "shape", "direction")
REFERENCE = (
    "each low-res frame's object (the analyzer's colour and shape, its bounding box's centre) "
    "rendered by the synthetic world {scale}x finer"
)


def load_pair(video: dict, low_tokenizer, high_tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """A super-resolved video's decoded low-res frames (codes_low.npy) and SR frames (pixels.npy
    for a stage that hands out pixels, else codes.npy decoded)."""
    folder = Path(video["dir"])
    low = np.asarray(low_tokenizer.decode(np.load(folder / "codes_low.npy", allow_pickle=False)), np.uint8)
    return low, video_frames(folder, high_tokenizer)


def same_as_hierarchy(video: dict, hierarchy: Path) -> bool:
    """The video's low-res codes equal the hierarchy's sample of the same prompt, duration and seed."""
    folder = Path(video["dir"])
    theirs = hierarchy / folder.parent.name / folder.name / "codes.npy"
    ours = np.load(folder / "codes_low.npy", allow_pickle=False)
    return theirs.is_file() and np.array_equal(np.load(theirs, allow_pickle=False), ours)


def super_resolution_summary(
    videos: list[dict], low_tokenizer, high_tokenizer, radius: float, hierarchy: Path | None = None
) -> dict:
    """The SR figures on the held-out videos (see the module's docstring)."""
    heldout = [v for v in videos if v["heldout"]]
    lows, srs = zip(*(load_pair(v, low_tokenizer, high_tokenizer) for v in heldout))
    scale = srs[0].shape[1] // lows[0].shape[1]
    references = [scene_reference(low, scale, radius) for low in lows]
    reference = np.concatenate(references)
    quality = sr_quality(reference, np.concatenate(srs), np.concatenate(lows))
    side = srs[0].shape[1]
    flickers = {
        "sr": float(np.mean([flicker(sr) for sr in srs])),
        "low_res_bicubic": float(np.mean([flicker(upsample_bicubic(low, side)) for low in lows])),
        "reference": float(np.mean([flicker(ref) for ref in references])),
    }
    entries = manifest_entries(heldout)
    analyses = {
        "low_res": [analyze_keyframes(low) for low in lows],
        "sr": [analyze_keyframes(sr) for sr in srs],
    }
    accuracy = {name: score(entries, found)["accuracy"]["heldout"] for name, found in analyses.items()}
    agreement = {
        key: float(np.mean([getattr(a, key) == getattr(b, key) for a, b in zip(*analyses.values())]))
        for key in ATTRIBUTES
    }
    out = {
        "videos": len(heldout),
        "frames": int(sum(len(sr) for sr in srs)),
        "scale": scale,
        "reference": REFERENCE.format(scale=scale),
        **quality,
        "tokenizer_ceiling": tokenizer_ceiling(reference, high_tokenizer),
        "psnr_gain_db": quality["sr"]["psnr_db"] - quality["bicubic"]["psnr_db"],
        "ssim_gain": quality["sr"]["ssim"] - quality["bicubic"]["ssim"],
        "flicker": flickers | {"sr_over_low_res": flickers["sr"] / max(flickers["low_res_bicubic"], 1e-9)},
        "prompt_scores": {
            "low_res": {k: accuracy["low_res"][k] for k in ATTRIBUTES},
            "sr": {k: accuracy["sr"][k] for k in ATTRIBUTES},
            "agreement": agreement,
        },
    }
    if hierarchy is not None:
        out["low_res_same_as_hierarchy"] = int(sum(same_as_hierarchy(v, hierarchy) for v in heldout))
    return out

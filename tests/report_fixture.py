"""A small demo report built without a demo run: rendered clips stand in for sampled videos (some
with a planted wrong colour, shape or motion, so verdicts of both kinds show), scored by the
demo's own evaluation, written by the demo's own report writer. Used by the report tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cogvideo.sampling.outputs import write_gif, write_video_entry
from cogvideo.synthetic import BACKGROUND, COLOURS, caption_for, render_frames
from demo.evaluation import analysis_row, analyze_keyframes, evaluate_samples, summarize, targets, verdicts
from demo.report import FamilyResult, write_report

PROMPTS = [("red", "circle", "left"), ("blue", "triangle", "up"), ("yellow", "square", "right")]
DURATIONS = (1.0, 4.0)
FRAMES, SIZE, SPEED = 9, 32, 4.25
SEAM = 12  # grey levels: still nearer the background than any palette colour


def sampled_videos(root: Path, pixels: bool = False) -> tuple[list[dict], list, list]:
    """Rows as `Demo.sample` writes them, with their analyses: prompt 2 is drawn cyan, prompt 3
    at 4 s as a circle, and prompt 1 at 1 s three times too fast. `pixels`: as a pixel model's
    sampler writes them (no codes; the exact frames in pixels.npy, a seam planted: the background
    right of column 16 a little brighter)."""
    videos, found, expected = [], [], []
    for i, (colour, shape, direction) in enumerate(PROMPTS):
        for duration in DURATIONS:
            fps = (FRAMES - 1) / duration
            reference = render_frames(colour, shape, direction, FRAMES, SIZE, fps, SPEED, seed=i)
            drawn = (
                "cyan" if i == 1 else colour,
                "circle" if (i == 2 and duration == 4.0) else shape,
                3 * SPEED if (i == 0 and duration == 1.0) else SPEED,
            )
            frames = render_frames(drawn[0], drawn[1], direction, FRAMES, SIZE, fps, drawn[2], seed=i)
            key = f"{colour}_{shape}_{direction}"
            folder = root / "samples" / f"{key}_{duration:g}"
            if pixels:
                background = np.all(frames == BACKGROUND, axis=-1, keepdims=True)
                frames = frames + (SEAM * background * (np.arange(SIZE) >= 16)[None, None, :, None]).astype(
                    np.uint8
                )
                write_video_entry(folder, None, frames, fps, {"pixels": frames})
            else:
                write_video_entry(folder, np.zeros((FRAMES, 4, 4), np.int64), frames, fps)
            ref_gif = root / "references" / f"{key}_{duration:g}.gif"
            ref_gif.parent.mkdir(parents=True, exist_ok=True)
            write_gif(ref_gif, reference, fps)
            video = {
                "key": key,
                "prompt": caption_for(colour, shape, direction),
                "colour": colour,
                "shape": shape,
                "direction": direction,
                "heldout": True,
                "duration": duration,
                "seed": 1,
                "fps": fps,
                "dir": str(folder),
                "reference_gif": str(ref_gif),
            }
            found.append(analyze_keyframes(frames))
            expected.append(analyze_keyframes(reference))
            video["analysis"], video["reference_analysis"] = (
                analysis_row(found[-1]),
                analysis_row(expected[-1]),
            )
            video["verdicts"] = verdicts(video)
            videos.append(video)
    assert len(COLOURS) == 6
    return videos, found, expected


def write_curves(root: Path) -> dict[str, Path]:
    curves = {}
    for stage in ("backbone", "stage1"):
        path = curves[stage] = root / f"{stage}_metrics.jsonl"
        path.write_text(
            "".join(json.dumps({"step": s, "loss": 5.0 / s, "lr": 1e-3}) + "\n" for s in range(1, 60))
        )
    return curves


def border_seams(frames: np.ndarray) -> tuple[float, float]:
    """A tiled sampler's seam measure for tiles meeting between columns 15 and 16: the mean
    difference of neighbouring pixels across that border and elsewhere."""
    steps = np.abs(np.diff(frames.astype(np.float64), axis=2)).mean(axis=(0, 1, 3))
    return float(steps[15]), float(np.delete(steps, 15).mean())


def pixel_family(root: Path) -> FamilyResult:
    """A pixel model's column, evaluated by the demo's evaluation (no tokenizer: the videos'
    pixels.npy; FVD as the caller has it) with its own goals, seams among them."""
    videos, _, _ = sampled_videos(root, pixels=True)
    for video in videos:
        for key in ("analysis", "reference_analysis", "verdicts", "reference_gif"):
            del video[key]
    summary = evaluate_samples(videos, None, SIZE, SPEED, 0, 1, root / "references", seams=border_seams)
    goals = {"colour": 0.9, "fvd": 150.0, "seams": 1.0}
    return FamilyResult("pixels", "pixel family", videos, summary, targets(summary, goals))


def build_report(root: Path, extra: list[FamilyResult] = ()) -> Path:
    """The report folder of one family's fixture results (and `extra` families'); returns index.html."""
    videos, found, expected = sampled_videos(root)
    summary = summarize(videos, found, expected)
    family = FamilyResult(
        name="fixture",
        title="fixture family",
        videos=videos,
        evaluation=summary,
        targets=targets(summary),
        curves=write_curves(root),
        details={"training": {"stage1": {"steps": 59}}},
    )
    run = {"step_seconds": {"videos": 3.0, "stage1": 400.0}, "total_seconds": 403.0, "machine": {"cpus": 2}}
    return write_report(root / "report", [family, *extra], run)

"""A small demo report built without a demo run: rendered clips stand in for sampled videos (some
with a planted wrong colour, shape or motion, so verdicts of both kinds show), scored by the
demo's own evaluation, written by the demo's own report writer. Used by the report tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cogvideo.sampling.outputs import write_gif, write_video_entry
from cogvideo.synthetic import COLOURS, caption_for, render_frames
from demo.evaluation import analysis_row, analyze_keyframes, summarize, targets, verdicts
from demo.report import FamilyResult, write_report

PROMPTS = [("red", "circle", "left"), ("blue", "triangle", "up"), ("yellow", "square", "right")]
DURATIONS = (1.0, 4.0)
FRAMES, SIZE, SPEED = 9, 32, 4.25


def sampled_videos(root: Path) -> tuple[list[dict], list, list]:
    """Rows as `Demo.sample` writes them, with their analyses: prompt 2 is drawn cyan, prompt 3
    at 4 s as a circle, and prompt 1 at 1 s three times too fast."""
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


def build_report(root: Path) -> Path:
    """The report folder of one family's fixture results; returns index.html."""
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
    return write_report(root / "report", [family], run)

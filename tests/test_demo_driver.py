"""The demo driver (demo/): step order, skip on rerun, rerun on changed settings, resume after a
failure; the synthetic data it asks cogvideo-synth for; the report it writes."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cogvideo.configio import ConfigError, to_dict
from cogvideo.synthetic import parse_caption
from data_prep.synthetic import render_row
from demo import driver as demo
from demo.settings import DemoConfig, VideoSettings
from demo.steps import Runner, Step

pytestmark = pytest.mark.filterwarnings("ignore")


def make_steps(calls: list[str], fail: set[str] | None = None) -> list[Step]:
    def runner(name):
        def run(out: Path):
            calls.append(name)
            (out / name).mkdir(exist_ok=True)
            (out / name / "partial").write_text("x")
            if fail and name in fail:
                raise RuntimeError(f"{name} failed")
            return {"made": name}

        return run

    return [
        Step("a", runner("a"), ("x",), ("a",)),
        Step("b", runner("b"), ("y",), ("b",)),
        Step("c", runner("c"), (), ("c",)),
    ]


def test_runner_runs_in_order_then_skips(tmp_path):
    calls: list[str] = []
    summary = Runner(tmp_path, make_steps(calls), {"x": 1, "y": 2}, log=lambda m: None).run(tmp_path)
    assert calls == ["a", "b", "c"]
    assert set(summary["step_seconds"]) == {"a", "b", "c"}
    assert summary["results"]["b"] == {"made": "b"}
    logged: list[str] = []
    Runner(tmp_path, make_steps(calls), {"x": 1, "y": 2}, log=logged.append).run(tmp_path)
    assert calls == ["a", "b", "c"]
    assert all("skipped" in line for line in logged)


def test_changed_settings_rerun_that_step_and_later_ones(tmp_path):
    calls: list[str] = []
    Runner(tmp_path, make_steps(calls), {"x": 1, "y": 2}, log=lambda m: None).run(tmp_path)
    (tmp_path / "b" / "stale").write_text("old")
    (tmp_path / "a" / "keep").write_text("old")
    calls.clear()
    Runner(tmp_path, make_steps(calls), {"x": 1, "y": 3}, log=lambda m: None).run(tmp_path)
    assert calls == ["b", "c"]
    assert not (tmp_path / "b" / "stale").exists()  # a changed step starts from a clean folder
    assert (tmp_path / "a" / "keep").exists()


def test_failed_step_resumes_without_clearing_and_redo_clears(tmp_path):
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="b failed"):
        Runner(tmp_path, make_steps(calls, fail={"b"}), {"x": 1, "y": 2}, log=lambda m: None).run(tmp_path)
    assert json.loads((tmp_path / "steps" / "b.json").read_text())["status"] == "running"
    assert not (tmp_path / "steps" / "c.json").exists()
    (tmp_path / "b" / "checkpoint").write_text("resumable")
    calls.clear()
    logged: list[str] = []
    Runner(tmp_path, make_steps(calls), {"x": 1, "y": 2}, log=logged.append).run(tmp_path)
    assert calls == ["b", "c"]
    assert (tmp_path / "b" / "checkpoint").exists()  # an interrupted step resumes from what it left
    assert any("b (resuming)" in line for line in logged)

    calls.clear()
    Runner(tmp_path, make_steps(calls), {"x": 1, "y": 2}, log=lambda m: None).run(tmp_path, until="a")
    assert calls == []
    Runner(tmp_path, make_steps(calls), {"x": 1, "y": 2}, log=lambda m: None).run(
        tmp_path, redo="b", until="b"
    )
    assert calls == ["b"]
    assert not (tmp_path / "b" / "checkpoint").exists()
    with pytest.raises(ConfigError, match="unknown step 'zzz'"):
        Runner(tmp_path, make_steps(calls), {"x": 1, "y": 2}, log=lambda m: None).run(tmp_path, redo="zzz")


def test_step_settings_cover_sections_and_config_files():
    cfg = DemoConfig()
    settings = demo.step_settings(cfg, demo.STEPS)
    assert settings["videos"] == to_dict(cfg.videos)
    assert settings["train.stage1"] == []
    assert "max_steps" in settings["configs/demo/train_stage1.yaml"]
    assert [s.name for s in demo.STEPS] == [
        "videos",
        "tokenizers",
        "shards",
        "backbone",
        "stage1",
        "stage2",
        "sample",
        "evaluate",
        "report",
    ]


def centroid_path(frames: np.ndarray) -> np.ndarray:
    from cogvideo.synthetic import BACKGROUND

    mask = np.any(frames != np.array(BACKGROUND, np.uint8), axis=-1)
    return np.array([np.argwhere(m).mean(axis=0) for m in mask])


def demo_rows(videos: VideoSettings, seed: int) -> list[dict]:
    synth = DemoConfig(seed=seed, videos=videos).synthetic("unused")
    assert synth.size == 32  # the small preset's frames
    return synth.plan()


def test_synthetic_rows_hold_out_combos_and_order_motion_by_duration():
    settings = VideoSettings(
        num_videos=300,
        durations=[1.0, 2.0, 4.0],
        speed_px_per_s=(4.0, 4.5),
        holdout=["red/circle/left", "cyan/square/up"],
    )
    rows = demo_rows(settings, seed=3)
    assert rows == demo_rows(settings, seed=3)
    combos = {(r["colour"], r["shape"], r["direction"]) for r in rows}
    assert not combos & {("red", "circle", "left"), ("cyan", "square", "up")}
    assert all(parse_caption(r["caption"]) == (r["colour"], r["shape"], r["direction"]) for r in rows)
    moves: dict[float, list[float]] = {}
    for row in rows[:60]:
        frames = render_row(row)
        keyframes = np.linspace(0, len(frames) - 1, 5).round().astype(int)  # stage 1 spans the clip
        path = centroid_path(frames[keyframes])
        moves.setdefault(row["duration_s"], []).append(np.abs(np.diff(path, axis=0)).sum(axis=1).mean())
    means = [np.mean(moves[d]) for d in (1.0, 2.0, 4.0)]
    assert means[0] < means[1] < means[2]
    assert means[2] >= 3.5 and means[1] >= 1.8


def test_synthetic_rows_refuse_paths_that_leave_the_frame():
    with pytest.raises(ConfigError, match="videos.speed_px_per_s"):
        DemoConfig(videos=VideoSettings(num_videos=1, durations=[4.0], speed_px_per_s=(4.0, 9.0)))
    with pytest.raises(ConfigError, match="videos.holdout"):
        DemoConfig(videos=VideoSettings(num_videos=1, holdout=["red/circle/sideways"]))


def test_report_links_every_file(tmp_path):
    from cogvideo.sampling.outputs import write_video_entry
    from demo.report import write_report

    videos = []
    for key, duration in [("red_circle_left", 1.0), ("red_circle_left", 4.0), ("blue_square_up", 1.0)]:
        folder = tmp_path / "samples" / f"{key}_{duration}"
        frames = np.zeros((9, 16, 16, 3), np.uint8)
        frames[:, 4:8, 4:8] = 200
        write_video_entry(folder, np.zeros((9, 4, 4), np.int64), frames, fps=8)
        videos.append(
            {
                "key": key,
                "prompt": key.replace("_", " "),
                "heldout": True,
                "duration": duration,
                "seed": 1,
                "dir": str(folder),
                "analysis": {"colour": "red", "displacement": 1.5},
            }
        )
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 / s, "lr": 1e-3}) + "\n" for s in range(1, 60))
    )
    metrics = {
        "targets": {"colour accuracy": {"value": 0.97, "goal": ">= 0.95", "met": True}},
        "evaluation": {
            "displacement_by_duration": {
                "1.0": {"generated": 1.2, "reference": 1.1},
                "4.0": {"generated": 3.9, "reference": 4.2},
            }
        },
        "step_seconds": {"videos": 3.0, "stage1": 400.0},
    }
    index = write_report(tmp_path / "report", metrics, videos, {"stage1": metrics_file})
    text = index.read_text()
    links = re.findall(r"(?:src|href)='([^']+)'", text)
    assert len(links) == 3 * 2 + 3  # gif + mp4 per video; contact sheet, displacement, curves
    for link in links:
        assert (index.parent / link).is_file(), link
    assert json.loads((index.parent / "metrics.json").read_text()) == metrics
    assert_shows_target_met_and_step_time(text)
    # planted: the same target missed must fail that check (the page says "missed")
    metrics["targets"]["colour accuracy"]["met"] = False
    missed = write_report(tmp_path / "missed", metrics, videos, {"stage1": metrics_file}).read_text()
    with pytest.raises(AssertionError):
        assert_shows_target_met_and_step_time(missed)


def table_rows(page: str) -> list[list[str]]:
    """Every table row of an HTML page as its cells' text (tags removed, entities decoded)."""
    return [
        [html.unescape(re.sub("<[^>]+>", "", cell)) for cell in re.findall(r"<t[dh]>(.*?)</t[dh]>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", page)
    ]


def assert_shows_target_met_and_step_time(page: str) -> None:
    rows = table_rows(page)
    assert ["colour accuracy", "0.97", ">= 0.95", "met"] in rows, rows
    assert ["stage1", "400"] in rows, rows


def analyze_frames(frames):
    from demo.report import analysis_row, analyze_keyframes

    return analysis_row(analyze_keyframes(frames))


def test_analyzer_reads_rendered_videos():
    from cogvideo.synthetic import COLOURS, DIRECTIONS, SHAPES, render_frames

    rng = np.random.default_rng(0)
    for i in range(24):
        colour, shape = list(COLOURS)[i % 6], SHAPES[i % 3]
        direction = list(DIRECTIONS)[(i // 3) % 4]
        duration = (1.0, 2.0, 4.0)[i % 3]
        speed = float(rng.uniform(4.0, 4.5))
        frames = render_frames(colour, shape, direction, 17, 32, 16 / duration, speed, seed=i)
        found = analyze_frames(frames)
        assert (found["colour"], found["shape"], found["direction"]) == (colour, shape, direction)
        # keyframes are 4 frames apart: the shape moves speed * duration / 4 px between them
        assert found["displacement"] == pytest.approx(speed * duration / 4, abs=0.6)
        frames[:, 0:2, 0:2] = COLOURS["green"]  # a stray fragment does not change what is seen
        assert analyze_frames(frames)["colour"] == colour
        assert analyze_frames(frames)["displacement"] == pytest.approx(found["displacement"])
    empty = np.zeros((17, 32, 32, 3), np.uint8) + 16
    assert analyze_frames(empty)["colour"] is None


def test_summary_scores_generated_and_reference_with_the_library_and_meets_targets_by_them():
    from cogvideo.eval.prompts import VideoAnalysis
    from demo.report import summarize, targets

    def video(duration):
        return {"prompt": "a red circle moving left", "heldout": True, "duration": duration, "dir": "x"}

    def seen(displacement, direction="left"):
        return VideoAnalysis("red", "circle", direction, displacement, (-displacement, 0.0), 5, 5)

    videos = [video(1.0), video(1.0), video(1.0), video(4.0), video(4.0)]
    generated = [seen(1.0), seen(2.0), seen(3.0), seen(4.0), seen(4.0, direction="up")]
    reference = [seen(1.0)] * 3 + [seen(4.0)] * 2
    summary = summarize(videos, generated, reference)
    by_duration = summary["displacement_by_duration"]
    assert by_duration["1"]["generated"] == pytest.approx(2.0) and by_duration["1"]["videos"] == 3
    assert by_duration["1"]["generated_sem"] == pytest.approx(1 / np.sqrt(3))
    assert by_duration["1"]["reference"] == pytest.approx(1.0)
    assert summary["reference"]["accuracy"]["heldout"]["all"] == 1.0
    goals = targets(summary)
    assert goals["held-out colour accuracy"]["met"]
    assert goals["held-out direction accuracy (4 s)"]["value"] == 0.5
    assert goals["displacement ordered by duration"]["met"]
    assert goals["displacement ordered by duration"]["value"] == "1 s: 2.00 ± 0.58 px, 4 s: 4.00 ± 0.00 px"

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from cogvideo.eval.prompts import ManifestEntry, analyze_video, read_manifest, score, score_manifest
from cogvideo.synthetic import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    caption_for,
    default_radius,
    render_frames,
    speed_range,
)
from cogvideo.video_io import list_videos, read_video, write_mp4

SIZE, FRAMES, FPS = 32, 8, 8.0
COMBOS = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))


def _render(colour, shape, direction, seed, speed=None):
    low, high = speed_range(SIZE, (FRAMES - 1) / FPS, default_radius(SIZE))
    speed = speed or float(np.random.default_rng(seed).uniform(low, high))
    return render_frames(colour, shape, direction, FRAMES, SIZE, FPS, speed, seed=seed), speed


def test_every_combination_rendered_and_through_lossy_mp4(tmp_path):
    wrong = []
    for seed, (colour, shape, direction) in enumerate(COMBOS):
        frames, speed = _render(colour, shape, direction, seed)
        path = write_mp4(tmp_path / f"{seed}.mp4", frames, FPS, crf=23)  # 4:2:0, lossy
        for source, video in (("rendered", frames), ("mp4", read_video(path)[0])):
            got = analyze_video(video)
            if (got.colour, got.shape, got.direction) != (colour, shape, direction):
                wrong.append((source, colour, shape, direction, got))
            elif abs(got.displacement_px_per_frame - speed / FPS) > 0.2:
                wrong.append((source, "speed", speed / FPS, got.displacement_px_per_frame))
    assert not wrong, wrong[:5]


def test_robust_to_stray_blobs_fragments_and_holes():
    rng = np.random.default_rng(0)
    wrong = []
    for seed, (colour, shape, direction) in enumerate(COMBOS[::5]):
        frames, _ = _render(colour, shape, direction, seed)
        frames = frames.copy()
        others = [c for c in COLOURS if c != colour]
        for frame in frames:
            y, x = rng.integers(0, SIZE - 3, 2)
            frame[y : y + 2, x : x + 3] = COLOURS[others[rng.integers(len(others))]]  # stray VQ blob
            ys, xs = np.nonzero((frame != frames[0][0, 0]).any(-1))
            frame[int(np.median(ys)), :] = frames[0][0, 0]  # a one-pixel background seam through the shape
            frame[int(np.median(ys)) + 2, int(np.median(xs))] = frames[0][0, 0]  # a hole
        got = analyze_video(frames)
        if (got.colour, got.shape, got.direction) != (colour, shape, direction):
            wrong.append((colour, shape, direction, got))
    assert not wrong, wrong


def test_empty_frames_have_no_answer():
    got = analyze_video(np.full((4, SIZE, SIZE, 3), 16, np.uint8))
    assert (got.colour, got.shape, got.direction, got.frames_with_object) == (None, None, None, 0)


def test_manifest_scores_heldout_accuracy_and_displacement_by_duration(tmp_path):
    rows = []
    for i, (duration, speed) in enumerate([(1.0, 10.0), (1.0, 10.0), (2.0, 20.0), (4.0, 30.0)]):
        colour, shape, direction = COMBOS[i * 7]
        frames, _ = _render(colour, shape, direction, i, speed=speed)
        write_mp4(tmp_path / f"{i}.mp4", frames, FPS)
        shown = caption_for(colour, shape, direction)
        prompt = shown if i != 1 else caption_for(colour, shape, "up" if direction != "up" else "down")
        rows.append({"file": f"{i}.mp4", "prompt": prompt, "duration": duration, "heldout": i < 2})
    (tmp_path / "manifest.json").write_text(json.dumps({"videos": rows}))
    report = score_manifest(tmp_path / "manifest.json")
    assert report["accuracy"]["heldout"] == {
        "videos": 2,
        "colour": 1.0,
        "shape": 1.0,
        "direction": 0.5,
        "all": 0.5,
        "constant": 1.0,
    }
    assert report["accuracy"]["seen"]["all"] == 1.0
    by = report["displacement_by_duration"]
    assert list(by) == ["1", "2", "4"] and by["1"]["videos"] == 2
    np.testing.assert_allclose(
        [by[k]["mean_px_per_frame"] for k in by], [10 / FPS, 20 / FPS, 30 / FPS], atol=0.2
    )
    assert report["displacement_increases_with_duration"] is True


def test_prompts_that_are_not_synthetic_captions_are_listed_and_the_rest_scored(tmp_path):
    colour, shape, direction = COMBOS[3]
    frames, _ = _render(colour, shape, direction, 0)
    write_mp4(tmp_path / "0.mp4", frames, FPS)
    write_mp4(tmp_path / "1.mp4", frames, FPS)
    rows = [
        {"file": "0.mp4", "prompt": "a dog running on the beach", "duration": 2.0},
        {"file": "1.mp4", "prompt": caption_for(colour, shape, direction), "duration": 2.0},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps(rows))
    report = score_manifest(tmp_path / "manifest.json")
    assert report["accuracy"]["all"]["videos"] == 1 and report["accuracy"]["all"]["all"] == 1.0
    [other] = report["unscored"]
    assert other["prompt"] == "a dog running on the beach" and other["file"].endswith("0.mp4")
    assert "not a synthetic caption" in other["reason"]


def test_manifest_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps([{"file": "a.mp4", "prompt": "a red circle moving left"}]))
    with pytest.raises(ValueError, match="m.json: video 0 has no 'duration'"):
        read_manifest(bad)
    bad.write_text(json.dumps([{"file": "a.mp4", "prompt": "a red circle moving left", "duration": "soon"}]))
    with pytest.raises(ValueError, match="m.json: video 0: duration 'soon' is not a number"):
        read_manifest(bad)
    with pytest.raises(ValueError, match="0 manifest entries but 1 analyses"):
        score([], [analyze_video(np.zeros((2, 8, 8, 3), np.uint8))])


def test_reads_a_sampler_output_folder(tmp_path):
    from cogvideo.sampling.job import write_manifest
    from cogvideo.sampling.outputs import write_video_entry
    from cogvideo.sampling.prompts import Prompt

    colour, shape, direction = COMBOS[5]
    frames, _ = _render(colour, shape, direction, 0)
    prompt = caption_for(colour, shape, direction)
    files = write_video_entry(tmp_path / "p0", np.zeros((len(frames), 2, 2), np.int64), frames, FPS)
    (tmp_path / "p0" / "record.json").write_text(
        json.dumps({"key": "p0", "prompt": prompt, "status": "ok", "files": files})
    )
    (tmp_path / "options.json").write_text(json.dumps({"duration": 2.0}))
    write_manifest(tmp_path, [Prompt(key="p0", text=prompt)])
    [entry], unscored = read_manifest(tmp_path / "manifest.json")
    assert unscored == []
    assert (entry.file, entry.prompt, entry.duration) == (tmp_path / "p0" / "video.mp4", prompt, 2.0)
    assert score_manifest(tmp_path / "manifest.json")["accuracy"]["all"]["all"] == 1.0
    assert list_videos(tmp_path).files == [
        str(tmp_path / "p0" / "video.mp4")
    ]  # what FVD reads of a sampler folder


def test_score_groups_accuracy_by_duration_and_gives_the_standard_error_of_displacement():
    from pathlib import Path

    from cogvideo.eval.prompts import ManifestEntry, VideoAnalysis

    def entry(duration, heldout=True):
        return ManifestEntry(Path("v.mp4"), "a red circle moving left", duration, heldout)

    def seen(displacement, colour="red"):
        return VideoAnalysis(colour, "circle", "left", displacement, (-displacement, 0.0), 5, 5)

    entries = [entry(1.0), entry(1.0), entry(1.0), entry(2.0), entry(2.0, heldout=False)]
    analyses = [seen(1.0), seen(2.0), seen(3.0, colour="blue"), seen(4.0), seen(5.0)]
    result = score(entries, analyses)
    one = result["displacement_by_duration"]["1"]
    assert one["mean_px_per_frame"] == pytest.approx(2.0) and one["videos"] == 3
    assert one["sem"] == pytest.approx(1 / np.sqrt(3))  # std (ddof 1) = 1 over sqrt(3) videos
    assert result["displacement_by_duration"]["2"]["sem"] == pytest.approx(0.5)  # 4 and 5: std 0.71 / sqrt 2
    assert result["accuracy_by_duration"]["heldout"]["1s"]["colour"] == pytest.approx(2 / 3)
    assert result["accuracy_by_duration"]["heldout"]["2s"] == {
        "videos": 1,
        "colour": 1.0,
        "shape": 1.0,
        "direction": 1.0,
        "all": 1.0,
        "constant": 0.0,  # these analyses carry no per-frame readings
    }
    assert result["accuracy_by_duration"]["seen"]["1s"] == {"videos": 0}
    assert result["accuracy"]["heldout"]["videos"] == 4 and result["displacement_increases_with_duration"]


def test_constant_means_one_colour_and_one_shape_in_every_frame():
    frames, _ = _render("magenta", "square", "left", seed=3)
    assert analyze_video(frames).constant
    changed = frames.copy()
    changed[2][(changed[2] == COLOURS["magenta"]).all(-1)] = COLOURS["red"]  # magenta turns red in one frame
    got = analyze_video(changed)
    assert got.colour == "magenta" and got.frame_colours[2] == "red" and not got.constant
    circle, _ = _render("magenta", "circle", "left", seed=3)
    reshaped = np.concatenate([frames[:4], circle[4:]])
    assert not analyze_video(reshaped).constant and analyze_video(reshaped).frame_shapes[-1] == "circle"
    vanished = frames.copy()
    vanished[5] = 16
    got = analyze_video(vanished)
    assert got.frame_colours[5] is None and not got.constant
    entries = [ManifestEntry(Path("x"), caption_for("magenta", "square", "left"), 1.0, True)] * 2
    assert score(entries, [analyze_video(frames), got])["accuracy"]["heldout"]["constant"] == 0.5


def test_a_speck_beside_the_object_does_not_change_its_shape():
    """A VQ speck that the closing joins to the object widens its bounding box: the ideal masks
    are fitted to the object, so squares stay squares (a template of the box's size read nearly
    every such square as a circle)."""
    wrong = []
    for seed, (colour, shape, direction) in enumerate(COMBOS[::2]):
        frame = _render(colour, shape, direction, seed)[0][0]
        ys, xs = np.nonzero((frame != frame[0, 0]).any(-1))
        cy, cx = int(np.median(ys)), int(np.median(xs))
        for name, (y, x) in {
            "above": (ys.min() - 2, cx),
            "below": (ys.max() + 2, cx),
            "left": (cy, xs.min() - 3),
            "right": (cy, xs.max() + 2),
        }.items():
            specked = frame.copy()
            specked[max(y, 0) : y + 2, max(x, 0) : x + 2] = COLOURS[colour]  # 2x2, one pixel off the object
            got = analyze_video(specked[None]).shape
            if got != shape:
                wrong.append((colour, shape, name, got))
    assert not wrong, wrong

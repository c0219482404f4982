"""The synthetic video generator: exact captions, exact geometry, deterministic real mp4 files."""

import json

import av
import numpy as np
import pytest

from cogvideo import synthetic as world
from data_prep import synthetic as syn


def test_caption_round_trip_for_every_combination():
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            for direction in world.DIRECTIONS:
                for word in (None, *world.SPEED_WORDS):
                    caption = world.caption_for(colour, shape, direction, word)
                    assert world.parse_caption(caption) == (colour, shape, direction)
    assert world.caption_for("red", "circle", "left") == "a red circle moving left"
    for bad in ("a red circle", "a purple circle moving left", "a red circle moving sideways", ""):
        with pytest.raises(ValueError):
            world.parse_caption(bad)
    with pytest.raises(ValueError, match="colour"):
        world.caption_for("purple", "circle", "left")


def test_colours_are_well_separated_from_each_other_and_the_background():
    palette = np.array([*world.COLOURS.values(), world.BACKGROUND], float)
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert len(world.COLOURS) >= 6
    assert distances[~np.eye(len(palette), dtype=bool)].min() > 100
    assert max(world.BACKGROUND) < 40


@pytest.mark.parametrize("shape", world.SHAPES)
@pytest.mark.parametrize("direction", world.DIRECTIONS)
def test_render_frames_moves_the_exact_shape_at_the_given_speed(shape, direction):
    size, fps, speed = 48, 4.0, 6.0
    frames = world.render_frames("green", shape, direction, 5, size, fps, speed, seed=3)
    assert frames.shape == (5, size, size, 3) and frames.dtype == np.uint8
    colours = {tuple(c) for c in frames.reshape(-1, 3)}
    assert colours == {world.BACKGROUND, world.COLOURS["green"]}  # no anti-aliased in-between pixels
    mask = (frames == world.COLOURS["green"]).all(-1)
    areas = mask.sum((1, 2))
    radius = world.default_radius(size)
    expected_area = {"circle": np.pi * radius**2, "square": (2 * radius) ** 2, "triangle": 2 * radius**2}[
        shape
    ]
    assert np.all(np.abs(areas - expected_area) < 0.15 * expected_area)
    # fully inside the frame: no shape pixel on the border
    assert not (mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any())
    ys, xs = np.nonzero(mask[0])
    centroid0 = np.array([xs.mean(), ys.mean()])
    ys, xs = np.nonzero(mask[-1])
    moved = np.array([xs.mean(), ys.mean()]) - centroid0
    assert np.allclose(moved, np.array(world.DIRECTIONS[direction]) * speed * 4 / fps, atol=1.0)


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("duration", [1.0, 2.0, 4.0])
def test_speed_range_keeps_visible_motion_inside_the_frame(size, duration):
    low, high = world.speed_range(size, duration, world.default_radius(size))
    assert low * duration / 4 >= world.MIN_PX_PER_SAMPLED_FRAME  # 5 frames spanning the video
    frames = world.render_frames("red", "square", "right", 5, size, 4 / duration, high)
    mask = (frames == world.COLOURS["red"]).all(-1)
    assert not (mask[:, :, 0].any() or mask[:, :, -1].any())
    with pytest.raises(ValueError, match="larger size"):
        world.speed_range(12, duration, world.default_radius(12))


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]), float(
            stream.average_rate
        )


def test_written_videos_are_deterministic_hold_out_and_decode_to_the_rendered_frames(tmp_path):
    holdout = {(c, s, d) for c in world.COLOURS for s in world.SHAPES for d in ("up", "down")}
    kwargs = dict(
        num_videos=6, seed=5, size=32, fps=8, duration_s=(1.0, 2.0), holdout=holdout, speed_words=True
    )
    captions = syn.write_videos(tmp_path / "a", syn.plan_videos(**kwargs))
    syn.write_videos(tmp_path / "b", syn.plan_videos(**kwargs))
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        video = tmp_path / "a" / row["path"]
        assert video.read_bytes() == (tmp_path / "b" / row["path"]).read_bytes()
        assert row["direction"] in ("left", "right")
        assert world.parse_caption(row["caption"]) == (row["colour"], row["shape"], row["direction"])
        frames, fps = decode(video)
        assert fps == 8 and len(frames) == row["num_frames"] == row["duration_s"] * 8 + 1
        expected = world.render_frames(
            row["colour"],
            row["shape"],
            row["direction"],
            row["num_frames"],
            32,
            8,
            row["speed_px_per_s"],
            seed=row["render_seed"],
            radius=row["radius"],
        )
        assert np.abs(frames.astype(int) - expected).max() <= 3  # lossless up to RGB<->YUV rounding

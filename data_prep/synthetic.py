"""Synthetic videos of one moving coloured shape, written as real mp4 files with exact captions.

    a red circle moving left            (speed words optional: "... moving left quickly")

Geometry is exact (no anti-aliasing: a pixel belongs to the shape iff its centre does), the
background is one plain colour and the video is lossless H.264 in 4:4:4, so an analyzer can
recover colour, shape and motion from decoded frames. Everything is seeded: the same
arguments give the same files, byte for byte.
"""
from __future__ import annotations

import argparse
import json
import math
from fractions import Fraction
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from cogvideo.configio import load_config

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND: tuple[int, int, int] = (16, 16, 16)
SPEED_WORDS: tuple[str, str] = ("slowly", "quickly")
# Motion the tokenizers and models can see: at least this many pixels between the 5 frames
# sampled over the whole video (CogVideo's frame-rate rule spans the clip).
MIN_PX_PER_SAMPLED_FRAME = 2.0
SAMPLED_FRAMES = 5


def caption_for(colour: str, shape: str, direction: str, speed_word: str | None = None) -> str:
    for name, value, known in (("colour", colour, COLOURS), ("shape", shape, SHAPES),
                               ("direction", direction, DIRECTIONS)):
        if value not in known:
            raise ValueError(f"caption_for: unknown {name} {value!r}; known: {sorted(known)}")
    if speed_word is not None and speed_word not in SPEED_WORDS:
        raise ValueError(f"caption_for: unknown speed word {speed_word!r}; known: {SPEED_WORDS}")
    caption = f"a {colour} {shape} moving {direction}"
    return f"{caption} {speed_word}" if speed_word else caption


def parse_caption(caption: str) -> tuple[str, str, str]:
    """The inverse of :func:`caption_for` (speed word ignored); ValueError on anything else."""
    words = caption.strip().split()
    if len(words) == 6 and words[5] in SPEED_WORDS:
        words = words[:5]
    if (len(words) != 5 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES
            or words[3] != "moving" or words[4] not in DIRECTIONS):
        raise ValueError(f"not a synthetic caption: {caption!r}")
    return words[1], words[2], words[4]


def default_radius(size: int) -> float:
    """Half the shape's extent: large enough to survive an 8x8-pixel-patch tokenizer."""
    return max(3.0, round(0.2 * size))


def shape_mask(shape: str, centre: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """bool [size, size]: pixels whose centre lies inside the shape."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":  # apex up, base at the bottom: |dx| <= (dy + r) / 2 for dy in [-r, r]
        return (dy <= radius) & (2 * np.abs(dx) <= dy + radius)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render_frames(colour: str, shape: str, direction: str, num_frames: int, size: int, fps: float,
                  speed_px_per_s: float, start_xy: tuple[float, float] | None = None, seed: int = 0,
                  radius: float | None = None) -> np.ndarray:
    """uint8 [T, size, size, 3]; frame t shows the shape centred at start + direction * speed * t / fps.

    Without `start_xy` the path is centred in the frame along the motion and placed at a seeded
    offset across it, always fully inside the frame.
    """
    if colour not in COLOURS or direction not in DIRECTIONS:
        raise ValueError(f"render_frames: unknown colour {colour!r} or direction {direction!r}")
    radius = default_radius(size) if radius is None else radius
    dx, dy = DIRECTIONS[direction]
    travel = speed_px_per_s * (num_frames - 1) / fps
    if start_xy is None:
        rng = np.random.default_rng(seed)
        across = rng.uniform(radius + 1, size - radius - 1)
        along = size / 2 - travel / 2
        start_xy = (along, across) if dx else (across, along)
        if dx < 0 or dy < 0:  # move towards the lower coordinate: start at the other end
            start_xy = (size - start_xy[0], start_xy[1]) if dx else (start_xy[0], size - start_xy[1])
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = BACKGROUND
    for t in range(num_frames):
        shift = speed_px_per_s * t / fps
        centre = (start_xy[0] + dx * shift, start_xy[1] + dy * shift)
        frames[t][shape_mask(shape, centre, radius, size)] = COLOURS[colour]
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """Lossless H.264 4:4:4 mp4, one encoder thread so the bytes are deterministic."""
    with av.open(str(path), "w", format="mp4") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264", rate=rate, options={"qp": "0", "preset": "veryfast"})
        stream.pix_fmt = "yuv444p"
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.codec_context.thread_count = 1
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def speed_range(size: int, duration_s: float, radius: float) -> tuple[float, float]:
    """px/s that keep >= MIN_PX_PER_SAMPLED_FRAME between 5 frames spanning the video and
    keep the whole path inside the frame."""
    room = size - 2 * radius - 2
    low = MIN_PX_PER_SAMPLED_FRAME * (SAMPLED_FRAMES - 1) / duration_s
    high = room / duration_s
    if high < low:
        raise ValueError(f"synthetic: a {size}px frame leaves {room:.0f}px of travel, fewer than the "
                         f"{low * duration_s:.0f}px needed for visible motion; use a larger size")
    return low, high


def generate_dataset(out_dir: str | Path, num_videos: int, seed: int = 0, size: int = 32, fps: float = 8,
                     duration_s: float | tuple[float, ...] = 4.0,
                     holdout: set[tuple[str, str, str]] = frozenset(),
                     speed_words: bool = False, colours: tuple[str, ...] | None = None) -> Path:
    """Write `num_videos` mp4 files and `captions.jsonl` under `out_dir`; return the captions path.

    Each video picks a (colour, shape, direction) not in `holdout`, a duration from `duration_s`
    and a speed in :func:`speed_range`. Caption rows also carry the ground truth (colour, shape,
    direction, speed_px_per_s, duration_s, fps, size, num_frames, radius, render_seed): passing
    them to :func:`render_frames` reproduces the video's frames exactly.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colours = tuple(colours or COLOURS)
    combos = [(c, s, d) for c in colours for s in SHAPES for d in DIRECTIONS if (c, s, d) not in holdout]
    if not combos:
        raise ValueError("generate_dataset: every colour/shape/direction combination is held out")
    durations = (duration_s,) if isinstance(duration_s, (int, float)) else tuple(duration_s)
    rng = np.random.default_rng(seed)
    radius = default_radius(size)
    rows = []
    for index in range(num_videos):
        colour, shape, direction = combos[rng.integers(len(combos))]
        duration = float(durations[rng.integers(len(durations))])
        low, high = speed_range(size, duration, radius)
        speed = float(rng.uniform(low, high))
        word = SPEED_WORDS[int(speed >= (low + high) / 2)] if speed_words else None
        num_frames = int(math.floor(duration * fps)) + 1
        render_seed = int(rng.integers(2**31))
        frames = render_frames(colour, shape, direction, num_frames, size, fps, speed,
                               seed=render_seed, radius=radius)
        name = f"synthetic_{index:06d}.mp4"
        write_mp4(out / name, frames, fps)
        rows.append({"path": name, "caption": caption_for(colour, shape, direction, word),
                     "colour": colour, "shape": shape, "direction": direction,
                     "speed_px_per_s": speed, "duration_s": duration, "fps": fps, "size": size,
                     "num_frames": num_frames, "radius": radius, "render_seed": render_seed})
    captions = out / "captions.jsonl"
    captions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return captions


@dataclass
class SynthConfig:
    out: str = "synthetic_videos"
    num_videos: int = 100
    seed: int = 0
    size: int = 32
    fps: float = 8.0
    durations: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    holdout: list[str] = field(default_factory=list)  # "colour/shape/direction"
    speed_words: bool = False


def main(argv: list[str] | None = None) -> None:
    """cogvideo-synth [--config synth.yaml] [key=value ...]"""
    parser = argparse.ArgumentParser(prog="cogvideo-synth", description=main.__doc__)
    parser.add_argument("--config", help="YAML file with SynthConfig fields")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. num_videos=500 size=48")
    args = parser.parse_args(argv)
    cfg = load_config(SynthConfig, args.config, args.overrides)
    holdout = set()
    for item in cfg.holdout:
        parts = tuple(item.split("/"))
        if len(parts) != 3:
            raise SystemExit(f"holdout: {item!r} is not colour/shape/direction")
        holdout.add(parts)
    captions = generate_dataset(cfg.out, cfg.num_videos, cfg.seed, cfg.size, cfg.fps, tuple(cfg.durations),
                                holdout, cfg.speed_words)
    print(f"wrote {cfg.num_videos} videos and {captions}")


if __name__ == "__main__":
    main()

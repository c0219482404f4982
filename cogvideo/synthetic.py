"""The synthetic world: coloured shapes moving in a direction, their captions and exact frames.

    a red circle moving left            (speed words optional: "... moving left quickly")

Geometry is exact (no anti-aliasing: a pixel belongs to the shape iff its centre does) and the
background is one plain colour, so an analyzer can recover colour, shape and motion from the
frames. This module is the one definition of that world: ``data_prep.synthetic`` renders and
writes videos with it, ``cogvideo.eval.prompts`` scores videos against it.
"""

from __future__ import annotations

import numpy as np

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
    for name, value, known in (
        ("colour", colour, COLOURS),
        ("shape", shape, SHAPES),
        ("direction", direction, DIRECTIONS),
    ):
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
    if (
        len(words) != 5
        or words[0] != "a"
        or words[1] not in COLOURS
        or words[2] not in SHAPES
        or words[3] != "moving"
        or words[4] not in DIRECTIONS
    ):
        raise ValueError(f"not a synthetic caption: {caption!r}")
    return words[1], words[2], words[4]


def default_radius(size: int) -> float:
    """Half the shape's extent: large enough to survive an 8x8-pixel-patch tokenizer."""
    return max(3.0, round(0.2 * size))


def shape_mask(
    shape: str, centre: tuple[float, float], radius: float, size: int, scale: int = 1
) -> np.ndarray:
    """bool [size * scale, size * scale]: pixels whose centre lies inside the shape; `scale` > 1
    draws the same scene (centre and radius in `size`-pixel units) on a grid that much finer."""
    ys, xs = (np.mgrid[0 : size * scale, 0 : size * scale] + 0.5) / scale
    return shape_mask_at(shape, xs - centre[0], ys - centre[1], radius)


def shape_mask_at(shape: str, dx: np.ndarray, dy: np.ndarray, radius) -> np.ndarray:
    """Whether points at offsets (dx, dy) from the shape's centre lie inside it (arrays broadcast:
    many centres and radii at once)."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":  # apex up, base at the bottom: |dx| <= (dy + r) / 2 for dy in [-r, r]
        return (dy <= radius) & (2 * np.abs(dx) <= dy + radius)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render_frames(
    colour: str,
    shape: str,
    direction: str,
    num_frames: int,
    size: int,
    fps: float,
    speed_px_per_s: float,
    start_xy: tuple[float, float] | None = None,
    seed: int = 0,
    radius: float | None = None,
    scale: int = 1,
) -> np.ndarray:
    """uint8 [T, size * scale, size * scale, 3]; frame t shows the shape centred at start +
    direction * speed * t / fps.

    Without `start_xy` the path is centred in the frame along the motion and placed at a seeded
    offset across it, always fully inside the frame. `scale` renders the same video on a grid
    `scale` times finer (geometry in `size`-pixel units): the high-resolution reference of a
    super-resolution model; its pixel (scale * y + scale // 2, scale * x + scale // 2) is the
    `size`-pixel frame's (y, x) for odd `scale`.
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
    frames = np.empty((num_frames, size * scale, size * scale, 3), np.uint8)
    frames[:] = BACKGROUND
    for t in range(num_frames):
        shift = speed_px_per_s * t / fps
        centre = (start_xy[0] + dx * shift, start_xy[1] + dy * shift)
        frames[t][shape_mask(shape, centre, radius, size, scale)] = COLOURS[colour]
    return frames


def speed_range(size: int, duration_s: float, radius: float) -> tuple[float, float]:
    """px/s that keep >= MIN_PX_PER_SAMPLED_FRAME between 5 frames spanning the video and
    keep the whole path inside the frame."""
    room = size - 2 * radius - 2
    low = MIN_PX_PER_SAMPLED_FRAME * (SAMPLED_FRAMES - 1) / duration_s
    high = room / duration_s
    if high < low:
        raise ValueError(
            f"synthetic: a {size}px frame leaves {room:.0f}px of travel, fewer than the "
            f"{low * duration_s:.0f}px needed for visible motion; use a larger size"
        )
    return low, high

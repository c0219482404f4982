"""Synthetic videos of one moving coloured shape (the world of ``cogvideo.synthetic``), written
as real mp4 files with exact captions: `cogvideo-synth`.

The video is lossless H.264 in 4:4:4, so an analyzer can recover colour, shape and motion from
decoded frames. Everything is seeded: the same arguments give the same files, byte for byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cogvideo.configio import ConfigError, config_parser, parse_config
from cogvideo.synthetic import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SPEED_WORDS,
    caption_for,
    default_radius,
    render_frames,
    speed_range,
)
from cogvideo.video_io import write_mp4


def fixed_speed_problem(speed_px_per_s: tuple[float, float], size: int, durations) -> str | None:
    """Why one speed range for every duration does not fit a `size`-pixel frame, or None."""
    low, high = speed_px_per_s
    room, longest = size - 2 * default_radius(size) - 2, max(durations)
    if not 0 < low <= high:
        return f"{[low, high]}: expected 0 < low <= high px/s"
    if high * longest > room:
        return (
            f"{[low, high]} px/s over {longest:g} s needs {high * longest:.0f} px of travel; "
            f"a {size}px frame has {room:.0f}px"
        )
    return None


def plan_videos(
    num_videos: int,
    seed: int = 0,
    size: int = 32,
    fps: float = 8,
    duration_s: float | tuple[float, ...] = 4.0,
    holdout: set[tuple[str, str, str]] = frozenset(),
    speed_words: bool = False,
    colours: tuple[str, ...] | None = None,
    speed_px_per_s: tuple[float, float] | None = None,
) -> list[dict]:
    """The caption rows of :func:`write_videos` (path, caption and the ground truth that
    :func:`render_row` turns back into frames), without rendering anything.

    Each video picks a (colour, shape, direction) not in `holdout`, a duration from `duration_s`
    and a speed: from `speed_px_per_s` when given (one range for every duration, so a longer clip
    moves further), else from :func:`speed_range` of its duration.
    """
    colours = tuple(colours or COLOURS)
    combos = [(c, s, d) for c in colours for s in SHAPES for d in DIRECTIONS if (c, s, d) not in holdout]
    if not combos:
        raise ValueError("plan_videos: every colour/shape/direction combination is held out")
    durations = (duration_s,) if isinstance(duration_s, (int, float)) else tuple(duration_s)
    if speed_px_per_s is not None and (problem := fixed_speed_problem(speed_px_per_s, size, durations)):
        raise ValueError(f"speed_px_per_s: {problem}")
    rng = np.random.default_rng(seed)
    radius = default_radius(size)
    rows = []
    for index in range(num_videos):
        colour, shape, direction = combos[rng.integers(len(combos))]
        duration = float(durations[rng.integers(len(durations))])
        low, high = speed_px_per_s or speed_range(size, duration, radius)
        speed = float(rng.uniform(low, high))
        word = SPEED_WORDS[int(speed >= (low + high) / 2)] if speed_words else None
        rows.append(
            {
                "path": f"synthetic_{index:06d}.mp4",
                "caption": caption_for(colour, shape, direction, word),
                "colour": colour,
                "shape": shape,
                "direction": direction,
                "speed_px_per_s": speed,
                "duration_s": duration,
                "fps": fps,
                "size": size,
                "num_frames": int(math.floor(duration * fps)) + 1,
                "radius": radius,
                "render_seed": int(rng.integers(2**31)),
            }
        )
    return rows


def render_row(row: dict, scale: int | None = None) -> np.ndarray:
    """The exact frames of one caption row of :func:`plan_videos` / ``captions.jsonl``; `scale`
    renders the same video at that many times its pixels per side (default: the row's own
    `scale`, 1 without one)."""
    return render_frames(
        row["colour"],
        row["shape"],
        row["direction"],
        row["num_frames"],
        row["size"],
        row["fps"],
        row["speed_px_per_s"],
        seed=row["render_seed"],
        radius=row["radius"],
        scale=row.get("scale", 1) if scale is None else scale,
    )


def write_videos(out_dir: str | Path, rows: list[dict], progress: bool = False, scale: int = 1) -> Path:
    """Write the mp4 files of the caption rows of :func:`plan_videos` and `captions.jsonl` under
    `out_dir`; return the captions path. Caption rows carry the ground truth (colour, shape,
    direction, speed_px_per_s, duration_s, fps, size, num_frames, radius, render_seed):
    :func:`render_row` reproduces a video's frames exactly. `scale`: every video rendered at that
    many times its pixels per side (the rows written carry it, their geometry in `size` pixels)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if progress:
        from tqdm import tqdm
    for row in tqdm(rows, desc="videos", unit="video") if progress else rows:
        write_mp4(out / row["path"], render_row(row, scale), row["fps"], lossless=True)
    captions = out / "captions.jsonl"
    written = [{**row, "scale": scale} if scale != 1 else row for row in rows]
    captions.write_text("".join(json.dumps(row) + "\n" for row in written))
    return captions


@dataclass
class SynthConfig:
    out: str = "synthetic_videos"  # folder for the mp4 files and captions.jsonl
    num_videos: int = 100
    seed: int = 0
    size: int = 32  # pixels per side
    fps: float = 8.0
    durations: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # seconds, one drawn per video
    holdout: list[str] = field(default_factory=list)  # "colour/shape/direction" combinations never drawn
    speed_words: bool = False  # append "slowly" / "quickly" to captions
    # one px/s range for every duration (a longer clip then moves further); default: per duration,
    # the range that keeps the motion visible between 5 frames spanning the clip (speed_range)
    speed_px_per_s: list[float] | None = None

    def __post_init__(self):
        if self.num_videos <= 0 or self.fps <= 0 or self.size <= 0:
            raise ConfigError(
                f"num_videos, fps and size: must be positive, got {self.num_videos}, {self.fps}, {self.size}"
            )
        if not self.durations or min(self.durations) <= 0:
            raise ConfigError(f"durations: expected positive seconds, got {self.durations}")
        if self.speed_px_per_s is not None:
            if len(self.speed_px_per_s) != 2:
                raise ConfigError(f"speed_px_per_s: expected [low, high], got {self.speed_px_per_s}")
            if problem := fixed_speed_problem(tuple(self.speed_px_per_s), self.size, self.durations):
                raise ConfigError(f"speed_px_per_s: {problem}")
        for duration in self.durations if self.speed_px_per_s is None else ():
            try:
                speed_range(self.size, duration, default_radius(self.size))
            except ValueError as err:
                raise ConfigError(f"size: {err}") from None
        self.holdout_combinations()

    def plan(self) -> list[dict]:
        """The caption rows of these settings (:func:`plan_videos`)."""
        return plan_videos(
            self.num_videos,
            self.seed,
            self.size,
            self.fps,
            tuple(self.durations),
            self.holdout_combinations(),
            self.speed_words,
            speed_px_per_s=self.speed_px_per_s,
        )

    def holdout_combinations(self) -> set[tuple[str, str, str]]:
        combos = set()
        for item in self.holdout:
            parts = tuple(item.split("/"))
            if (
                len(parts) != 3
                or parts[0] not in COLOURS
                or parts[1] not in SHAPES
                or parts[2] not in DIRECTIONS
            ):
                raise ConfigError(
                    f"holdout: {item!r} is not colour/shape/direction with colour in {list(COLOURS)}, "
                    f"shape in {list(SHAPES)}, direction in {list(DIRECTIONS)}"
                )
            combos.add(parts)
        return combos


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(
        SynthConfig,
        "cogvideo-synth",
        "Write captioned synthetic videos of one moving coloured shape (mp4 + captions.jsonl).",
    )
    cfg, _ = parse_config(SynthConfig, parser, argv)
    captions = write_videos(cfg.out, cfg.plan(), progress=True)
    print(f"wrote {cfg.num_videos} videos and {captions}")


if __name__ == "__main__":
    main()

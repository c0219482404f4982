"""Prompt-following on the synthetic world (``cogvideo.synthetic``), from frames alone.

Per frame: foreground = pixels nearer to a palette colour than to the background, closed (3x3) so a shape broken
into fragments by a VQ tokenizer stays one object, and only the largest connected component is
kept (stray blobs are ignored). Per video:
- colour: the palette colour nearest to the median foreground colour, majority over frames;
- shape: the shape whose ideal mask (the synthetic world's own ``shape_mask_at``, fitted to the
  object in place and size around its bounding box) overlaps the object best (IoU), majority over
  frames;
- motion: a least-squares line through the per-frame centroids; its slope is the displacement
  per frame (px) and its dominant axis and sign the direction;
- constancy: the object is found in every frame and every frame reads the same colour and shape
  (an object that changes colour or shape within a video, or vanishes, is not constant).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from cogvideo.synthetic import BACKGROUND, COLOURS, DIRECTIONS, SHAPES, parse_caption, shape_mask_at
from cogvideo.video_io import read_video

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], np.float64)
MIN_TRAVEL_PX = 1.0  # below this over the whole video the object counts as still (direction None)


@dataclass
class VideoAnalysis:
    colour: str | None
    shape: str | None
    direction: str | None
    displacement_px_per_frame: float
    velocity_px_per_frame: tuple[float, float]  # (x, y), image coordinates (y down)
    frames_with_object: int
    frames: int
    frame_colours: tuple[str | None, ...] = ()  # per frame (None: no object found)
    frame_shapes: tuple[str | None, ...] = ()

    @property
    def constant(self) -> bool:
        """The object is in every frame, with one colour and one shape throughout."""
        return (
            self.frames > 0
            and self.frames_with_object == self.frames
            and len(set(self.frame_colours)) == 1
            and len(set(self.frame_shapes)) == 1
        )


def largest_object(frame: np.ndarray) -> np.ndarray | None:
    """bool [H, W] mask of the largest foreground component, or None on an empty frame."""
    # a pixel is foreground when a palette colour is nearer than the background: edge pixels
    # that codecs (4:2:0 chroma) or tokenizers blend half-way into the background drop out
    pixels = frame.astype(np.float64)[..., None, :]
    to_palette = np.linalg.norm(pixels - _PALETTE, axis=-1).min(-1)
    foreground = to_palette < np.linalg.norm(pixels[..., 0, :] - np.array(BACKGROUND), axis=-1)
    labels, count = ndimage.label(ndimage.binary_closing(foreground, np.ones((3, 3)), border_value=0))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel(), weights=foreground.ravel())[1:]
    # closing only joins fragments; the shape's outline is the foreground's own
    return ndimage.binary_fill_holes((labels == 1 + int(sizes.argmax())) & foreground)


# the ideal masks are fitted to the object: centred within FIT_OFFSETS_PX of its bounding box's
# centre, with a radius FIT_SHRINK_PX less than half its longer side (a speck that the closing
# joins to the object widens the box by up to 3 px; a template of the box alone then lost to the
# circle for nearly every square with a speck: on rendered frames with one or two 1-2 px specks
# next to the object, squares were read right in 7 % at the box's size, in 93 % fitted)
FIT_OFFSETS_PX = np.arange(-1.5, 1.51, 0.5)
FIT_SHRINK_PX = np.arange(-0.25, 2.01, 0.25)


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose ideal mask, fitted to the object in place and size, overlaps it best (IoU)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    # no template reaches further than `margin` beyond the box: the pixels around it decide
    margin = int(np.ceil(FIT_OFFSETS_PX.max() - FIT_SHRINK_PX.min()))
    top, left = max(y0 - margin, 0), max(x0 - margin, 0)
    mask = mask[top : y1 + margin, left : x1 + margin]
    # pixel centres against every fitted template at once: [offset x, offset y, radius, H, W]
    grid_y, grid_x = np.mgrid[top : top + mask.shape[0], left : left + mask.shape[1]] + 0.5
    dx = grid_x - ((x0 + x1) / 2 + FIT_OFFSETS_PX[:, None, None, None, None])
    dy = grid_y - ((y0 + y1) / 2 + FIT_OFFSETS_PX[None, :, None, None, None])
    radius = max(y1 - y0, x1 - x0) / 2 - FIT_SHRINK_PX[None, None, :, None, None]

    def iou(shape: str) -> float:
        ideal = shape_mask_at(shape, dx, dy, radius)
        return float(((ideal & mask).sum((-2, -1)) / np.maximum((ideal | mask).sum((-2, -1)), 1)).max())

    return max(SHAPES, key=iou)


def nearest_colour(pixels: np.ndarray) -> str:
    median = np.median(pixels.reshape(-1, 3).astype(np.float64), axis=0)
    return _PALETTE_NAMES[int(np.linalg.norm(_PALETTE - median, axis=1).argmin())]


def _majority(votes: list[str]) -> str | None:
    return Counter(votes).most_common(1)[0][0] if votes else None


def analyze_video(frames: np.ndarray) -> VideoAnalysis:
    """uint8 [T, H, W, 3] -> what the video shows."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"analyze_video: expected [T, H, W, 3] frames, got {list(frames.shape)}")
    colours, shapes, times, centroids = [], [], [], []
    frame_colours, frame_shapes = [None] * len(frames), [None] * len(frames)
    for t, frame in enumerate(frames):
        mask = largest_object(frame)
        if mask is None:
            continue
        frame_colours[t] = nearest_colour(frame[mask])
        frame_shapes[t] = classify_shape(mask)
        colours.append(frame_colours[t])
        shapes.append(frame_shapes[t])
        ys, xs = np.nonzero(mask)
        times.append(t)
        centroids.append((xs.mean(), ys.mean()))
    velocity = (0.0, 0.0)
    direction = None
    if len(times) >= 2:
        slope = np.polyfit(np.array(times, np.float64), np.array(centroids), 1)[0]  # [vx, vy] px per frame
        velocity = (float(slope[0]), float(slope[1]))
        if np.hypot(*slope) * (len(frames) - 1) >= MIN_TRAVEL_PX:
            axis = int(np.abs(slope).argmax())
            step = [0, 0]
            step[axis] = int(np.sign(slope[axis]))
            direction = next(name for name, d in DIRECTIONS.items() if tuple(d) == tuple(step))
    return VideoAnalysis(
        _majority(colours),
        _majority(shapes),
        direction,
        float(np.hypot(*velocity)),
        velocity,
        len(times),
        len(frames),
        tuple(frame_colours),
        tuple(frame_shapes),
    )


@dataclass(frozen=True)
class ManifestEntry:
    file: Path
    prompt: str
    duration: float
    heldout: bool = False


def read_manifest(path: str | Path) -> tuple[list[ManifestEntry], list[dict]]:
    """(entries to score, the rest): JSON, a list (or {"videos": [...]}) of {"file", "prompt",
    "duration", optional "heldout"}; files are relative to the manifest's folder. Entries whose
    prompt is not a synthetic caption cannot be scored: they come back as {file, prompt, reason}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON manifest ({err})") from err
    if isinstance(data, dict) and "entries" in data:  # a cogvideo-sample output folder
        rows = _sampler_rows(path, data["entries"])
    else:
        rows = data.get("videos") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of videos or {{'videos': [...]}}")
    entries, unscored = [], []
    for i, row in enumerate(rows):
        for key in ("file", "prompt", "duration"):
            if not isinstance(row, dict) or key not in row:
                raise ValueError(f"{path}: video {i} has no {key!r}")
        try:
            duration = float(row["duration"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: video {i}: duration {row['duration']!r} is not a number") from None
        try:
            parse_caption(row["prompt"])
        except ValueError as err:
            unscored.append(
                {"file": str(path.parent / row["file"]), "prompt": row["prompt"], "reason": str(err)}
            )
            continue
        entries.append(
            ManifestEntry(path.parent / row["file"], row["prompt"], duration, bool(row.get("heldout", False)))
        )
    return entries, unscored


def _sampler_rows(path: Path, entries: list[dict]) -> list[dict]:
    """The sampler's manifest entries as videos; their duration is the run's (options.json)."""
    options_file = path.parent / "options.json"
    try:
        duration = json.loads(options_file.read_text(encoding="utf-8"))["duration"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(
            f"{options_file}: the sampler's options (with 'duration') are needed ({err})"
        ) from err
    return [
        {"file": f"{e['key']}/{e['files']['mp4']}", "prompt": e["prompt"], "duration": duration}
        for e in entries
        if e.get("status") == "ok"
    ]


def _accuracy(pairs: list[tuple[tuple, VideoAnalysis]]) -> dict:
    if not pairs:
        return {"videos": 0}
    out = {"videos": len(pairs)}
    for k, name in enumerate(("colour", "shape", "direction")):
        out[name] = float(np.mean([want[k] == getattr(got, name) for want, got in pairs]))
    out["all"] = float(np.mean([want == (got.colour, got.shape, got.direction) for want, got in pairs]))
    out["constant"] = float(np.mean([got.constant for _, got in pairs]))  # colour and shape held throughout
    return out


def _increasing(means: list[float], durations: list[float]) -> bool | str:
    """Whether the mean displacement grows with the duration prefix; "not measured" (and why) where
    fewer than two durations have scored videos."""
    if len(means) < 2:
        seen = f"only {durations[0]:g} s" if durations else "none"
        return f"not measured: scored videos of two or more durations are needed ({seen})"
    return bool(all(np.diff(means) > 0))


def score(entries: list[ManifestEntry], analyses: list[VideoAnalysis]) -> dict:
    """Accuracy against the prompts (all, held-out combinations, seen ones; each also by duration
    prefix), the fraction of videos whose colour and shape stay constant, and displacement per frame grouped by the duration prefix (mean, spread and the
    standard error of the mean: how far the mean of this many videos could be off)."""
    if len(entries) != len(analyses):
        raise ValueError(f"score: {len(entries)} manifest entries but {len(analyses)} analyses")
    pairs = [(parse_caption(e.prompt), a) for e, a in zip(entries, analyses)]
    by_duration = defaultdict(list)
    for entry, analysis in zip(entries, analyses):
        by_duration[entry.duration].append(analysis.displacement_px_per_frame)
    displacement = {
        f"{d:g}": {
            "mean_px_per_frame": float(np.mean(v)),
            "std": float(np.std(v)),
            "sem": float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan"),
            "videos": len(v),
        }
        for d, v in sorted(by_duration.items())
    }
    means = [np.mean(v) for _, v in sorted(by_duration.items())]
    sets = {"all": lambda e: True, "heldout": lambda e: e.heldout, "seen": lambda e: not e.heldout}
    return {
        "accuracy": {
            name: _accuracy([p for p, e in zip(pairs, entries) if keep(e)]) for name, keep in sets.items()
        },
        "accuracy_by_duration": {
            name: {
                f"{d:g}s": _accuracy([p for p, e in zip(pairs, entries) if keep(e) and e.duration == d])
                for d in sorted(by_duration)
            }
            for name, keep in sets.items()
        },
        "displacement_by_duration": displacement,
        "displacement_increases_with_duration": _increasing(means, sorted(by_duration)),
        "videos": [
            {
                "file": str(e.file),
                "prompt": e.prompt,
                "duration": e.duration,
                "heldout": e.heldout,
                **asdict(a),
                "constant": a.constant,
            }
            for e, a in zip(entries, analyses)
        ],
    }


def score_manifest(path: str | Path) -> dict:
    """Scores of the videos whose prompt is a synthetic caption; the others are listed under
    "unscored" with the reason."""
    entries, unscored = read_manifest(path)
    result = score(entries, [analyze_video(read_video(e.file)[0]) for e in entries])
    return {**result, "unscored": unscored}

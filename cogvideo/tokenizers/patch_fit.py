"""Fitting the patch tokenizer (:mod:`cogvideo.tokenizers.patch_vq`), and its command.

The codebook is fitted by k-means (k-means++ seeding, Lloyd steps whose distance matmuls run in
bf16 where the CPU runs bf16 fast, as :mod:`cogvideo.precision` decides, fp32 otherwise), then
every code is snapped to the real training patch nearest to its centroid: crisp patches keep
corners and pure colours where cluster means blur them. The context table holds the mean
training patch of every (code, 4 neighbour codes) key seen in the frames.

Command: ``cogvideo-fit-image-tokenizer preset=small frames=DIR_OR_GLOB out=FILE.safetensors``
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cogvideo.configio import ConfigError, config_parser, parse_config
from cogvideo.metrics import psnr
from cogvideo.models.cogvideo.config import ModelConfig, preset_setting
from cogvideo.precision import Precision, PrecisionChoice, choose_precision, probe_shape
from cogvideo.tokenizers.image import check_frames
from cogvideo.tokenizers.patch_vq import (
    CHUNK,
    FRAMES_PER_CHUNK,
    MAX_CONTEXT_CODES,
    PatchVQTokenizer,
    context_keys,
    nearest,
    to_patches,
    with_colour,
)
from cogvideo.video_io import VIDEO_SUFFIXES, Listing, list_media, square_frames

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Extra weight on the mean colour when matching patches: without it a small shape's partial
# patches take the code of a neighbouring colour (yellow -> orange) whose mask fits better.
DEFAULT_COLOUR_WEIGHT = 4.0
# Held-out frames this far (dB) below the training frames (4x their squared error) mean codes that
# fit the training videos rather than video in general.
GENERALISATION_GAP_DB = 6.0
FLAT_MARGIN_DB = 1.0  # codes that add less than this over flat colour carry no texture to speak of
# What a tokenizer that the model learns well with reaches, where measured (README, Measured).
MEASURED_REFERENCE = {
    "small": "the demo's tokenizer reaches 27.4 dB on its synthetic world's held-out videos (flat shapes; "
    "`make demo`, whose model learns colour, shape and direction with it)",
}


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability ~ squared distance."""
    sq = x.pow(2).sum(1)
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    dist = (sq - 2 * x @ x[chosen[0]] + sq[chosen[0]]).clamp(min=0)
    draws = torch.rand(k, generator=generator, dtype=torch.float64)
    for u in draws[1:]:
        cumulative = dist.double().cumsum(0)
        i = min(int(torch.searchsorted(cumulative, u * cumulative[-1])), len(x) - 1)
        chosen.append(i)
        dist = torch.minimum(dist, (sq - 2 * x @ x[i] + sq[i]).clamp(min=0))
    return x[chosen].clone()


def fit_precision(requested: str, feature_dim: int, codebook_size: int) -> PrecisionChoice:
    """The precision of k-means' distance matmuls ([CHUNK, features] @ [features, codes]) on this CPU."""
    return choose_precision(requested, "cpu", probe_shape(CHUNK, feature_dim, codebook_size))


def kmeans(
    x: torch.Tensor,
    k: int,
    iterations: int,
    seed: int = 0,
    seed_sample: int = 16,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Lloyd's k-means, assignments computed in `dtype`; empty clusters restart at the
    worst-served points."""
    generator = torch.Generator().manual_seed(seed)
    sample = x[torch.randperm(len(x), generator=generator)[: seed_sample * k]]
    centres = _kmeans_plus_plus(sample, k, generator)
    x_low = x.to(dtype)
    for _ in tqdm(range(iterations), desc="k-means", unit="iter", disable=not progress, file=sys.stderr):
        assign = nearest(x_low, centres)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        updated = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], centres)
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):
            error = (x - updated[assign]).pow(2).sum(1)
            updated[empty] = x[error.topk(len(empty)).indices]
        centres = updated
    return centres


def snap_to_data(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Replace every centre by the data row nearest to it."""
    best_dist = torch.full((len(centres),), float("inf"))
    best_row = torch.zeros(len(centres), dtype=torch.long)
    c_sq = centres.pow(2).sum(1)
    for i in range(0, len(x), CHUNK):
        chunk = x[i : i + CHUNK]
        dist = chunk.pow(2).sum(1)[:, None] - 2 * chunk @ centres.T + c_sq
        value, row = dist.min(0)
        better = value < best_dist
        best_dist[better], best_row[better] = value[better], row[better] + i
    return x[best_row].clone()


def fit_context_table(tokenizer: PatchVQTokenizer, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean training patch for every (code, 4 neighbour codes) key seen in ``frames``."""
    keys = context_keys(tokenizer.encode(frames), tokenizer.codebook_size).reshape(-1)
    table_keys, inverse = np.unique(keys, return_inverse=True)
    inverse = torch.from_numpy(inverse.reshape(-1))
    sums = torch.zeros(len(table_keys), tokenizer.patch_size**2 * 3)
    per_chunk = FRAMES_PER_CHUNK * tokenizer.tokens_side**2
    for i in range(0, len(frames), FRAMES_PER_CHUNK):
        start = i * tokenizer.tokens_side**2
        sums.index_add_(
            0,
            inverse[start : start + per_chunk],
            to_patches(frames[i : i + FRAMES_PER_CHUNK], tokenizer.tokens_side),
        )
    counts = torch.bincount(inverse, minlength=len(table_keys))
    patches = (sums / counts[:, None]).round().clamp(0, 255).to(torch.uint8).numpy()
    return table_keys, patches


def fit_patch_tokenizer(
    frames: np.ndarray,
    codebook_size: int,
    frame_size: int,
    tokens_side: int,
    *,
    preset: str,
    seed: int = 0,
    iterations: int = 12,
    max_patches: int = 131072,
    crisp: bool = True,
    context: bool = True,
    colour_weight: float = DEFAULT_COLOUR_WEIGHT,
    progress: bool = False,
    precision: str = "auto",
) -> PatchVQTokenizer:
    """Fit a ``codebook_size``-code patch tokenizer on uint8 frames [T, frame_size, frame_size, 3]
    for the model preset ``preset`` (recorded in the tokenizer and its file).

    k-means runs on at most ``max_patches`` random patches, its assignments in ``precision``
    (``auto``: :func:`fit_precision`); the context table (``context``) is built from all frames.
    ``progress`` reports each phase and k-means iteration on stderr.
    """
    frames = check_frames(frames, frame_size)
    if tokens_side <= 0 or frame_size % tokens_side:
        raise ValueError(f"tokens_side: expected a divisor of frame_size={frame_size}, got {tokens_side}")
    if context and codebook_size > MAX_CONTEXT_CODES:
        raise ValueError(
            f"context table: codebook_size={codebook_size} is above {MAX_CONTEXT_CODES}; "
            "fit with context=False"
        )
    x = sample_patches(frames, tokens_side, codebook_size, max_patches, seed)
    features = with_colour(x, colour_weight)
    report = _reporter(progress)
    choice = fit_precision(precision, features.shape[1], codebook_size)
    report(
        f"k-means: {codebook_size} codes from {len(x)} patches of {len(frames)} frames, {iterations} iterations; "
        f"{choice.describe()}"
    )
    if choice.warning:
        print(f"warning: {choice.warning}", file=sys.stderr)
    centres = kmeans(features, codebook_size, iterations, seed, progress=progress, dtype=choice.dtype)
    if crisp:
        report("snapping each code to its nearest training patch")
        centres = snap_to_data(features, centres)
    codebook = centres[:, : x.shape[1]]
    tokenizer = PatchVQTokenizer(
        codebook, frame_size, tokens_side, colour_weight=colour_weight, preset=preset
    )
    if not context:
        return tokenizer
    report(f"context table: encoding {len(frames)} frames")
    table = fit_context_table(tokenizer, frames)
    return PatchVQTokenizer(
        codebook, frame_size, tokens_side, context=table, colour_weight=colour_weight, preset=preset
    )


def sample_patches(
    frames: np.ndarray, tokens_side: int, codebook_size: int, max_patches: int, seed: int
) -> torch.Tensor:
    """At most ``max_patches`` random patches of ``frames`` (a random subset of frames, then of
    their patches), checked to hold at least ``codebook_size`` distinct ones."""
    generator = torch.Generator().manual_seed(seed)
    per_frame = tokens_side**2
    if len(frames) * per_frame > max_patches:
        subset = torch.randperm(len(frames), generator=generator)[: -(-max_patches // per_frame)]
        x = to_patches(frames[np.sort(subset.numpy())], tokens_side)
        x = x[torch.randperm(len(x), generator=generator)[:max_patches]]
    else:
        x = to_patches(frames, tokens_side)
    distinct = len(torch.unique(x, dim=0))
    if distinct < codebook_size:
        raise ValueError(
            f"codebook_size={codebook_size} needs at least as many distinct patches; "
            f"the frames hold {distinct}"
        )
    return x


def _reporter(progress: bool):
    started = time.perf_counter()

    def report(message: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return report


def _square(image, frame_size: int) -> np.ndarray:
    """PIL image -> uint8 [S, S, 3]: centre crop to a square, then resize (area filter)."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    if (w, h) != (side, side):
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side != frame_size:
        image = image.resize((frame_size, frame_size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


@dataclass
class FrameSet:
    """Frames read for a fit, where each came from, and what was not read."""

    frames: np.ndarray  # uint8 [T, S, S, 3]
    sources: np.ndarray  # [T]: index into `files` of the file each frame came from
    files: list[str]  # files that gave frames
    skipped: list[str]  # one line per file that could not be read: "FILE: why"
    ignored: list[str]  # files of the folder with neither an image nor a video suffix


def _read_file(path: str, frame_size: int, max_frames: int) -> np.ndarray:
    """One file's frames at `frame_size`; ValueError naming the file when it cannot be read."""
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        try:
            with Image.open(path) as image:
                return _square(image, frame_size)[None]
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path}: not a readable image ({err.__class__.__name__})") from None
    return square_frames(path, frame_size, max_frames)


def read_frames(spec: str, frame_size: int, max_frames: int = 20000, progress: bool = False) -> FrameSet:
    """Frames from a directory or glob of png/jpg images and video files (decoded at `frame_size`,
    as cogvideo.video_io.square_frames does), in file-name order up to ``max_frames``. A file that
    cannot be read is skipped and named (the rule data preparation follows); FileNotFoundError
    when nothing gives frames."""
    try:
        listing = list_media([spec], IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    except FileNotFoundError:
        listing = Listing([])
    frames, sources, files, skipped = [], [], [], []
    for path in tqdm(
        listing.files, desc="reading frames", unit="file", disable=not progress, file=sys.stderr
    ):
        try:
            read = _read_file(path, frame_size, max_frames - len(frames))
        except ValueError as err:
            skipped.append(str(err))
            tqdm.write(f"skipping {err}", file=sys.stderr)
            continue
        frames.append(read)
        sources += [len(files)] * len(read)
        files.append(path)
        if len(sources) >= max_frames:
            break
    if not frames:
        raise FileNotFoundError(
            f"no frames found at {spec} (expected {', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)}"
            + (f"; {len(skipped)} file(s) unreadable" if skipped else "")
            + ")"
        )
    return FrameSet(np.concatenate(frames), np.array(sources), files, skipped, listing.ignored)


def held_out_split(sources: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out frames: whole files (so that no video has frames on both
    sides) until ``fraction`` of the frames, or single frames when there is one file."""
    rng = np.random.default_rng(seed)
    target = max(1, int(round(len(sources) * fraction))) if len(sources) > 1 else 0
    held = np.zeros(len(sources), bool)
    files = np.unique(sources)
    if len(files) == 1:
        held[rng.permutation(len(sources))[:target]] = True
        return held
    for file in rng.permutation(files)[:-1]:  # keep at least one file for fitting
        if held.sum() >= target:
            break
        held |= sources == file
    return held


@dataclass
class FitImageTokenizerConfig:
    preset: str = (
        "small"  # model preset: gives frame_size, tokens per side (frame_tokens) and the codebook size
    )
    frames: str = ""  # directory or glob of png/jpg frames or video files
    out: str = ""  # output .safetensors file (records what was fitted, the preset included)
    codebook_size: int = 0  # 0: the preset's vocab.num_image_tokens
    held_out: float = (
        0.1  # fraction of frames kept out of the fit for the PSNR (whole files when there are several)
    )
    max_frames: int = 20000
    iterations: int = 12  # k-means iterations
    seed: int = 0
    crisp: bool = True  # snap codes to real training patches (false: k-means means, blurrier edges)
    colour_weight: float = (
        DEFAULT_COLOUR_WEIGHT  # weight of the mean-colour distance when matching patches (0: L2)
    )
    context: bool = True  # decode with the (code, 4 neighbours) context table
    precision: Precision = "auto"  # k-means' distance matmuls (auto: bf16 where this CPU runs it fast)

    def model_config(self) -> ModelConfig:
        return preset_setting(self.preset)

    def __post_init__(self):
        if not self.frames or not self.out.endswith(".safetensors"):
            raise ConfigError(
                f"frames and out: required, out ending in .safetensors, got frames={self.frames!r} "
                f"out={self.out!r}"
            )
        limit = self.model_config().vocab.num_image_tokens
        if not 0 <= self.codebook_size <= limit:
            raise ConfigError(
                f"codebook_size: {self.codebook_size} codes do not fit preset {self.preset!r} "
                f"(vocab.num_image_tokens={limit}); give at most {limit}, or 0 for all of them"
            )
        if not 0 <= self.held_out < 1:
            raise ConfigError(f"held_out: expected a fraction in [0, 1), got {self.held_out}")


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(
        FitImageTokenizerConfig,
        "cogvideo-fit-image-tokenizer",
        "Fit the small patch image tokenizer for a model preset and report its reconstruction "
        "PSNR on held-out frames.",
    )
    cfg, _ = parse_config(FitImageTokenizerConfig, parser, argv)
    model = cfg.model_config()
    codebook_size = cfg.codebook_size or model.vocab.num_image_tokens
    start = time.perf_counter()
    try:
        read = read_frames(cfg.frames, model.frame_size, cfg.max_frames, progress=True)
        is_held = held_out_split(read.sources, cfg.held_out, cfg.seed)
        held, train = read.frames[is_held], read.frames[~is_held]
        tokenizer = fit_patch_tokenizer(
            train,
            codebook_size,
            model.frame_size,
            model.frame_tokens,
            seed=cfg.seed,
            iterations=cfg.iterations,
            crisp=cfg.crisp,
            context=cfg.context,
            colour_weight=cfg.colour_weight,
            preset=cfg.preset,
            progress=True,
            precision=cfg.precision,
        )
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    tokenizer.save(cfg.out)
    print(
        f"fitted {codebook_size} codes of {tokenizer.patch_size}x{tokenizer.patch_size} patches for preset "
        f"{cfg.preset!r} ({model.frame_size}px frames, {model.frame_tokens}x{model.frame_tokens} codes) on "
        f"{len(train)} frames of {len(read.files) - len(np.unique(read.sources[is_held]))} file(s) in "
        f"{time.perf_counter() - start:.1f}s ({len(tokenizer.context[0]) if tokenizer.context else 0} context "
        f"entries) -> {cfg.out}"
    )
    if read.skipped or read.ignored:
        print(
            f"not read: {len(read.skipped)} unreadable file(s) (named above), {len(read.ignored)} file(s) of "
            f"other types ({', '.join(f'{k} {v}' for k, v in Listing([], read.ignored).ignored_by_suffix().items())})"
        )
    for line in quality_report(
        tokenizer, train, held, [read.files[i] for i in np.unique(read.sources[is_held])]
    ):
        print(line)


def flat_patch_psnr(frames: np.ndarray, patch_size: int) -> float:
    """PSNR of painting every patch its mean colour: what codes of flat colours could do at best."""
    t, h, w, c = frames.shape
    x = frames.astype(np.float64).reshape(t, h // patch_size, patch_size, w // patch_size, patch_size, c)
    flat = np.broadcast_to(x.mean((2, 4), keepdims=True), x.shape).reshape(frames.shape)
    return psnr(frames, flat.round().astype(np.uint8))


def quality_report(
    tokenizer: PatchVQTokenizer, train: np.ndarray, held: np.ndarray, held_files: list[str]
) -> list[str]:
    """What the fit reaches on its training frames and on the held-out ones (naming their files),
    and what a usable tokenizer reaches: above flat colour, near its training frames."""
    train_psnr = psnr(train, tokenizer.decode(tokenizer.encode(train)))
    lines = [f"train PSNR {train_psnr:.2f} dB on {len(train)} frames"]
    if not len(held):
        return lines + [
            "held-out PSNR: not measured (held_out=0, or a single frame): quality on other videos unknown"
        ]
    held_psnr = psnr(held, tokenizer.decode(tokenizer.encode(held)))
    flat = flat_patch_psnr(held, tokenizer.patch_size)
    shown = ", ".join(held_files[:5]) + (f" and {len(held_files) - 5} more" if len(held_files) > 5 else "")
    lines.append(
        f"held-out PSNR {held_psnr:.2f} dB on {len(held)} frames of {len(held_files)} file(s): {shown}"
    )
    preset = tokenizer.preset
    lines.append(
        "held-out PSNR bounds how the model's videos can look (the tokenizer decodes every generated frame). "
        f"Usable: over {flat + FLAT_MARGIN_DB:.2f} dB ({FLAT_MARGIN_DB:g} dB over painting each "
        f"{tokenizer.patch_size}x{tokenizer.patch_size} patch its mean colour, on these frames) and within "
        f"{GENERALISATION_GAP_DB:g} dB of the training frames; on preset "
        f"{preset!r} {MEASURED_REFERENCE.get(preset, 'no reference is measured')}."
    )
    if held_psnr < flat + FLAT_MARGIN_DB or train_psnr - held_psnr > GENERALISATION_GAP_DB:
        lines.append(
            f"This fit is not there ({held_psnr - flat:+.1f} dB over flat colour, {train_psnr - held_psnr:.1f} dB "
            f"below its training frames): its codes fit these videos, not others; fit on more, and more "
            f"varied, videos (frames=...) before training on its codes."
        )
    return lines


if __name__ == "__main__":
    main()

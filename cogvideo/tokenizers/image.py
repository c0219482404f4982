"""The image-tokenizer interface: uint8 frames [T, H, W, 3] <-> integer codes [T, h, w].

Two implementations: :class:`~cogvideo.tokenizers.patch_vq.PatchVQTokenizer` (a small
patch codebook fitted on CPU, stored as ``.safetensors``) and
:class:`~cogvideo.tokenizers.icetk_vq.IceImageTokenizer` (icetk's VQ-VAE from a local
``ice_image.pt``). Both import this module; :func:`cogvideo.tokenizers.loading.load_image_tokenizer`
picks one from the path.
"""

from __future__ import annotations

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

    # the same tokenizer at another grid (a super-resolution model's high-res frames)
    def at_grid(self, tokens_side: int) -> "ImageTokenizer": ...

    # not part of the protocol: the patch tokenizer's decode_mean(probs [T, h, w, K]) -> float
    # [T, H, W, 3], the exact expected decode (super-resolution's sr_strategy.kind=mean); icetk's
    # convolutional decoder has none


def check_frames(frames: np.ndarray, frame_size: int) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (frame_size, frame_size, 3):
        raise ValueError(
            f"frames: expected uint8 [T, {frame_size}, {frame_size}, 3], "
            f"got {frames.dtype} {list(frames.shape)}"
        )
    return frames


def check_codes(codes: np.ndarray, tokens_side: int, codebook_size: int) -> np.ndarray:
    codes = np.asarray(codes)
    if (
        not np.issubdtype(codes.dtype, np.integer)
        or codes.ndim != 3
        or codes.shape[1:] != (tokens_side, tokens_side)
    ):
        raise ValueError(
            f"codes: expected an integer array [T, {tokens_side}, {tokens_side}], "
            f"got {codes.dtype} {list(codes.shape)}"
        )
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(
            f"codes: expected values in [0, {codebook_size}), got [{codes.min()}, {codes.max()}]"
        )
    return codes.astype(np.int64)

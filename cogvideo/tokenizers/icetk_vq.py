"""icetk's image tokenizer (CogView2/CogVideo): a 3-level hierarchical VQ-VAE with 20000 codes.

The architecture is icetk's own (``icetk.vqvae``, installed with ``pip install --no-deps
icetk==0.0.7``); the weights come from a local ``ice_image.pt`` (``{"module": state_dict}``),
never from a download. Its keys and shapes are checked against the architecture before
loading, so a truncated, corrupted or wrong file is refused with the offending key names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cogvideo.tokenizers._torchvision_standin import torchvision_importable
from cogvideo.tokenizers.icetk_files import ICETK_IMAGE_MODEL, resolve_icetk_file
from cogvideo.tokenizers.image import check_codes, check_frames

# icetk's pixel normalisation (ImageTokenizer.tr_normalize), frames in [0, 1]
PIXEL_MEAN = (0.79093, 0.76271, 0.75340)
PIXEL_STD = (0.30379, 0.32279, 0.32800)
LEVEL_OF_COMPRESSION = {4: 0, 8: 1, 16: 2}  # icetk's `l`: 8x compression (160px -> 20x20) is level 1
FRAMES_PER_BATCH = 8


class CheckpointMismatchError(ValueError):
    pass


def build_icetk_vqvae(device: str | torch.device = "meta") -> torch.nn.Module:
    """icetk's default HVQVAE (weights uninitialised on the meta device unless asked)."""
    # icetk's generated protobuf module predates protobuf 4; sentencepiece ships the same
    # ModelProto, so icetk imports it instead and needs no PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION.
    import sentencepiece.sentencepiece_model_pb2 as sentencepiece_model_pb2

    sys.modules.setdefault("icetk.sentencepiece_model_pb2", sentencepiece_model_pb2)
    try:
        with torchvision_importable():
            from icetk.vqvae import load_default_HVQVAE
    except ImportError as err:
        raise ImportError(
            f"icetk's VQ-VAE is needed for {ICETK_IMAGE_MODEL}: pip install --no-deps icetk==0.0.7 ({err})"
        ) from err
    with torch.device(device):
        return load_default_HVQVAE()


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def verify_state_dict(state: dict, expected: dict[str, torch.Size], where: str) -> None:
    """Raise CheckpointMismatchError naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{key} (expected {list(expected[key])}, got "
        f"{list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__})"
        for key, value in sorted(state.items())
        if key in expected and not (isinstance(value, torch.Tensor) and value.shape == expected[key])
    ]
    problems = [
        f"{len(keys)} {kind} keys: {_names(keys)}"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointMismatchError(f"{where}: does not match icetk's image VQ-VAE: " + "; ".join(problems))


def resolve_image_model(path: str | Path) -> Path:
    return resolve_icetk_file(path, ICETK_IMAGE_MODEL, "icetk image tokenizer")


def read_icetk_checkpoint(path: Path) -> dict:
    try:  # weights_only: a checkpoint is data; it must not run code when opened
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointMismatchError(
            f"{path}: not a readable torch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("module"), dict):
        found = (
            sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        )
        raise CheckpointMismatchError(f"{path}: expected icetk's {{'module': state_dict}}, found {found}")
    return checkpoint["module"]


class IceImageTokenizer:
    """Frames -> codes at one level of icetk's hierarchy (8x compression by default)."""

    def __init__(self, model: torch.nn.Module, frame_size: int = 160, compression: int = 8):
        if compression not in LEVEL_OF_COMPRESSION:
            raise ValueError(
                f"compression: expected one of {sorted(LEVEL_OF_COMPRESSION)}, got {compression}"
            )
        if frame_size % compression:
            raise ValueError(
                f"frame_size: expected a multiple of compression={compression}, got {frame_size}"
            )
        self.model = model.eval()
        self.level = LEVEL_OF_COMPRESSION[compression]
        self.frame_size = frame_size
        self.tokens_side = frame_size // compression
        self.codebook_size = model.quantize.n_embed
        self.device = next(model.parameters()).device
        self._mean = torch.tensor(PIXEL_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(PIXEL_STD, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def load(
        cls, path: str | Path, device: str = "cpu", frame_size: int = 160, compression: int = 8
    ) -> "IceImageTokenizer":
        path = resolve_image_model(path)
        model = build_icetk_vqvae("meta")
        state = read_icetk_checkpoint(path)
        verify_state_dict(state, {k: v.shape for k, v in model.state_dict().items()}, str(path))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        return cls(model.to(device), frame_size, compression)

    def at_grid(self, tokens_side: int) -> "IceImageTokenizer":
        """The same model for frames of `tokens_side` codes per side (DSR's 60 x 60 -> 480 px)."""
        return IceImageTokenizer(
            self.model, tokens_side * self.frame_size // self.tokens_side, self.frame_size // self.tokens_side
        )

    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        frames = check_frames(frames, self.frame_size)
        codes = []
        for start in range(0, len(frames), FRAMES_PER_BATCH):
            x = torch.from_numpy(frames[start : start + FRAMES_PER_BATCH]).to(self.device)
            x = (x.permute(0, 3, 1, 2).float() / 255 - self._mean) / self._std
            codes.append(self.model.single_encode(x, self.level)[2].cpu())
        return (
            torch.cat(codes).numpy().astype(np.int64)
            if codes
            else np.zeros((0, self.tokens_side, self.tokens_side), np.int64)
        )

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = check_codes(codes, self.tokens_side, self.codebook_size)
        frames = []
        for start in range(0, len(codes), FRAMES_PER_BATCH):
            batch = torch.from_numpy(codes[start : start + FRAMES_PER_BATCH]).to(self.device)
            # icetk's decoder for level l is decs[2 - l]
            image = self.model.single_decode_code(batch, self.level) * self._std + self._mean
            frames.append((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return (
            torch.cat(frames).numpy()
            if frames
            else np.zeros((0, self.frame_size, self.frame_size, 3), np.uint8)
        )

    def codebook(self) -> np.ndarray:
        return self.model.quantize.embed.weight.detach().float().cpu().numpy().copy()

"""Which image tokenizer a path holds: the factory over the implementations of
:class:`cogvideo.tokenizers.image.ImageTokenizer` (kept apart from the interface, which the
implementations import)."""

from __future__ import annotations

from pathlib import Path

from cogvideo.tokenizers.image import ImageTokenizer


def load_image_tokenizer(
    path: str | Path, device: str = "cpu", frame_size: int | None = None
) -> ImageTokenizer:
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
    raise ValueError(
        f"{path}: unknown image tokenizer; expected a .safetensors patch tokenizer, "
        f"or {ICETK_IMAGE_MODEL} (or its directory)"
    )

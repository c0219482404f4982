"""What data preparation writes for a model family: an encoder turns the frames of a batch of
samples (uint8 [samples, frames, size, size, 3]) into the named arrays of the family's shard
kind (`cogvideo.shards.KINDS`). The family names its encoder (`ModelFamily.prep_encoder`); each
runs on Ray actors that load it once, and is first checked on the driver before Ray starts.

    tokens     image-token codes from the image tokenizer (`prep.tokenizer`): CogVideo
    sr_tokens  each frame's codes at the model's grid and at its super-resolution grid (the
               same tokenizer at the larger grid): DSR, whose frames are read at the high-res
               size and area-averaged down for the low-res codes
    frames     the frames themselves, uint8 RGB: pixel-space families
    latents    each frame's posterior moments under the model's frozen KL-VAE (`model.vae.path`, a
               diffusers AutoencoderKL folder): GLOBER

An encoder class has `kind` (the shard kind it writes), `arrays` (the names it returns),
`pixel_size(model)` (the frame side it reads), `settle(cfg) -> cfg` (driver side:
fill defaults, raise ConfigError naming the key when it cannot work), `__init__(cfg, model,
device)` (once per actor) and `__call__(pixels) -> {array name: array with samples first}`.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import torch

from cogvideo.configio import ConfigError
from cogvideo.family import section_family
from data_prep.config import PrepConfig, prep_model


def load_object(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def load_tokenizer(cfg: PrepConfig, device: str = "cpu"):
    """The image tokenizer of ``prep.tokenizer``; ConfigError when it is missing or unreadable."""
    if not cfg.tokenizer:
        raise ConfigError(
            "prep.tokenizer: the image tokenizer path is required "
            "(fit one with cogvideo-fit-image-tokenizer preset=...)"
        )
    try:
        return load_object(cfg.tokenizer_loader)(cfg.tokenizer, device=device)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"prep.tokenizer: {err}") from None


def check_tokenizer(cfg: PrepConfig, model, tokenizer) -> None:
    """Its frame size, codes per side and codebook fit the model (ConfigError naming both)."""
    got = (tokenizer.frame_size, tokenizer.tokens_side)
    fix = f"fit one with cogvideo-fit-image-tokenizer preset={cfg.model['preset']}"
    if got != (model.frame_size, model.frame_tokens):
        raise ConfigError(
            f"prep.tokenizer {cfg.tokenizer}: encodes {got[0]}px frames to {got[1]}x{got[1]} codes, "
            f"but the model ({cfg.model['preset']}) needs {model.frame_size}px and "
            f"{model.frame_tokens}x{model.frame_tokens} (model.frame_size, model.frame_tokens): {fix}"
        )
    if tokenizer.codebook_size > model.vocab.num_image_tokens:
        raise ConfigError(
            f"prep.tokenizer {cfg.tokenizer}: {tokenizer.codebook_size} codes, but the model "
            f"({cfg.model['preset']}) has {model.vocab.num_image_tokens} (model.vocab.num_image_tokens): {fix}"
        )


class TokenEncoder:
    kind, arrays = "tokens", ("frames",)

    @staticmethod
    def pixel_size(model) -> int:
        return model.frame_size

    @staticmethod
    def settle(cfg: PrepConfig) -> PrepConfig:
        """The image tokenizer loads and fits the model; an unset model.preset becomes the preset
        the tokenizer was fitted for."""
        tokenizer = load_tokenizer(cfg)
        if cfg.model.get("preset") is None:
            cfg = dataclasses.replace(cfg, model={**cfg.model, "preset": getattr(tokenizer, "preset", None)})
        check_tokenizer(cfg, prep_model(cfg), tokenizer)
        return cfg

    def __init__(self, cfg: PrepConfig, model, device: str = "cpu"):
        self.tokenizer = load_tokenizer(cfg, device)
        check_tokenizer(cfg, model, self.tokenizer)
        self.side = model.frame_tokens

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        count, frames, size = pixels.shape[:3]
        codes = self.tokenizer.encode(pixels.reshape(-1, size, size, 3))
        return {"frames": codes.reshape(count, frames, self.side, self.side)}


class PairedTokenEncoder(TokenEncoder):
    """Frames read at the model's high-res size (`high_frame_size`); `sr_frames` their codes at
    the high-res grid, `frames` the codes of their area average at the model's frame size (a box
    filter over the scale x scale pixels, as the pipeline's `flags=area` scaling)."""

    kind, arrays = "tokens", ("frames", "sr_frames")

    @staticmethod
    def pixel_size(model) -> int:
        return model.high_frame_size

    def __init__(self, cfg: PrepConfig, model, device: str = "cpu"):
        super().__init__(cfg, model, device)
        self.high = self.tokenizer.at_grid(model.high_frame_tokens)
        self.scale, self.high_side = model.scale, model.high_frame_tokens

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        count, frames, size = pixels.shape[:3]
        low_size, s = size // self.scale, self.scale
        low = pixels.reshape(count, frames, low_size, s, low_size, s, 3).mean(axis=(3, 5))
        codes = super().__call__(np.rint(low).astype(np.uint8))
        high = self.high.encode(pixels.reshape(-1, size, size, 3))
        return codes | {"sr_frames": high.reshape(count, frames, self.high_side, self.high_side)}


class PixelEncoder:
    kind, arrays = "frames", ("pixels",)

    @staticmethod
    def pixel_size(model) -> int:
        return model.frame_size

    @staticmethod
    def settle(cfg: PrepConfig) -> PrepConfig:
        prep_model(cfg)
        return cfg

    def __init__(self, cfg: PrepConfig, model, device: str = "cpu"):
        pass

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return {"pixels": pixels}


class LatentEncoder:
    """The model's frozen KL-VAE (`model.vae.path`: a diffusers AutoencoderKL folder) encodes each
    frame once; a sample stores every frame's posterior moments, float32 [frames, 2 C', h, w]
    (mean, then log-variance): the family draws its latents from them at training time.
    Its modules (diffusers) are imported where it runs: the ~2 s import would otherwise start
    every job's encoder actors, whichever encoder they load."""

    kind, arrays = "latents", ("latents",)

    @staticmethod
    def pixel_size(model) -> int:
        return model.frame_size

    @staticmethod
    def settle(cfg: PrepConfig) -> PrepConfig:
        from cogvideo.models.glober.vae import vae_folder_problem

        model = prep_model(cfg)
        if not model.vae.path:
            raise ConfigError(
                "prep.model.vae.path: latent shards need the model's KL-VAE, a diffusers AutoencoderKL "
                "folder (Stable Diffusion's vae/, or one fitted with cogvideo-fit-vae)"
            )
        if problem := vae_folder_problem(model.vae):
            raise ConfigError(f"prep.{problem}")
        return cfg

    def __init__(self, cfg: PrepConfig, model, device: str = "cpu"):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(model.vae.path, use_safetensors=True).to(device).eval()
        self.device = device

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        from cogvideo.models.glober.vae import encode_moments

        count, frames = pixels.shape[:2]
        x = torch.from_numpy(pixels).to(self.device).flatten(0, 1).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            moments = encode_moments(self.vae, x)
        return {"latents": moments.unflatten(0, (count, frames)).float().cpu().numpy()}


ENCODERS = {
    "tokens": TokenEncoder,
    "sr_tokens": PairedTokenEncoder,
    "frames": PixelEncoder,
    "latents": LatentEncoder,
}


def encoder_for(cfg: PrepConfig):
    """The encoder class of the family `prep.model` names."""
    try:
        family = section_family(cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if family.prep_encoder not in ENCODERS:
        raise ConfigError(
            f"prep.model.family: {family.name} asks for encoder {family.prep_encoder!r}, which data "
            f"preparation does not have (known: {sorted(ENCODERS)})"
        )
    encoder = ENCODERS[family.prep_encoder]
    if encoder.kind != family.shard_kind:
        raise ConfigError(
            f"prep.model.family: {family.name} reads {family.shard_kind} shards, but its encoder "
            f"{family.prep_encoder!r} writes {encoder.kind}"
        )
    return encoder

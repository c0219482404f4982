"""`cogvideo-sample --family glober`: GLOBER's sampling options and the pipeline the sampling job
(cogvideo/sampling/job.py: resume, Ray actors, records, manifest, contact sheet) drives.

Per prompt: the caption (in the text format the checkpoint trained on, with the duration
prefix of `duration`) -> the DiT draws one global feature (DDIM, guidance against the guidance
text) -> the video decoder renders `frames` frames at normalised indices spanning the clip (each
from its own noise, or with `shared_frame_noise` all from one),
`frame_batch` at a time (DDIM, guidance against the zero global feature) -> the KL-VAE's pixels.
Each prompt draws its noise from its own generator, seeded by (seed, prompt key): its video is
the same whatever the batch, worker or rerun that samples it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cogvideo.models.glober.batch import padded_text
from cogvideo.models.glober.sampler import GloberSampler, GloberSampling, frame_indices
from cogvideo.precision import Precision
from cogvideo.sampling.models import join_parallel, load_eval_model, sampling_device, width_precision
from cogvideo.sampling.options import path_problems
from cogvideo.sampling.prompts import Prompt

log = logging.getLogger(__name__)


@dataclass
class GloberSampleOptions:
    checkpoint: str = ""  # a GLOBER phase-generator checkpoint (cogvideo-convert zero ...)
    text_tokenizer: str = ""  # the tokenizer the DiT trained with
    seed: int = 1234
    batch_size: int = 1  # prompts a worker takes at a time (each sampled on its own generator)
    dtype: Precision = "fp32"
    device: str = "cpu"
    tensor_parallel: int = 1  # splits the DiT (cogvideo-sample under torchrun)
    workers: int = 1
    global_steps: int = 50  # DDIM steps of the DiT (the paper's 50)
    global_guidance: float = 9.0  # the DiT's guidance scale (the paper's 9.0)
    frame_steps: int = 50  # DDIM steps of the video decoder (the paper's 50)
    frame_guidance: float = 6.0  # the decoder's guidance (the paper: 6.0 UCF-101, 3.0 Sky / TaiChi)
    eta: float = 0.0  # DDIM's eta
    frames: int = 0  # frames rendered per video, any number; 0 = the clip length trained on
    frame_batch: int = 32  # frames the decoder renders at once (the paper: 32 for 128-frame videos)
    # one noise draw for every frame of a video (its frames then differ by their index alone); off:
    # a draw per frame, the paper's
    shared_frame_noise: bool = False
    duration: float = 4.0  # seconds, for the caption's duration prefix and the output frame rate
    fps: float = 0.0  # output frame rate; 0 = (frames - 1) / duration

    def problems(self) -> list[str]:
        found = path_problems(required={"checkpoint": self.checkpoint, "text_tokenizer": self.text_tokenizer})
        for key in ("global_steps", "frame_steps", "frame_batch", "batch_size", "workers"):
            if getattr(self, key) < 1:
                found.append(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.frames < 0:
            found.append(f"frames: must be >= 0 (0: the trained clip length), got {self.frames}")
        if self.duration <= 0:
            found.append(f"duration: must be > 0, got {self.duration}")
        return found

    def sampling(self) -> GloberSampling:
        return GloberSampling(
            global_steps=self.global_steps,
            global_guidance=self.global_guidance,
            frame_steps=self.frame_steps,
            frame_guidance=self.frame_guidance,
            eta=self.eta,
            frame_batch=self.frame_batch,
        )


class GloberPipeline:
    options_class = GloberSampleOptions

    def __init__(self, options: GloberSampleOptions, model, text_format, tokenizer):
        self.options, self.model, self.cfg = options, model, model.cfg
        self.text_format, self.tokenizer = text_format, tokenizer
        self.sampler = GloberSampler(model, options.sampling())
        self.num_frames = options.frames or self.cfg.num_frames

    @classmethod
    def precision(cls, options: GloberSampleOptions):
        """options.dtype resolved on this device (`auto`: by a product of the model's width)."""
        return width_precision(
            options.dtype, options.device, options.checkpoint, lambda cfg: 2 * cfg.seq_length
        )

    @classmethod
    def load(cls, options: GloberSampleOptions) -> "GloberPipeline":
        from cogvideo.checkpoint import load_text_format
        from cogvideo.tokenizers.text import TextTokenizer

        join_parallel(options.tensor_parallel)
        path, device = Path(options.checkpoint), sampling_device(options.device)
        model, cfg = load_eval_model(
            path,
            device,
            options.tensor_parallel,
            lambda cfg: (
                None
                if type(cfg).__name__ == "GloberConfig" and cfg.phase == "generator"
                else f"holds {cfg.name}, not a GLOBER phase-generator model (cogvideo-sample --family)"
            ),
        )
        precision = cls.precision(options)
        log.info(precision.describe())
        model = model.to(dtype=precision.dtype)
        return cls(options, model, load_text_format(path), TextTokenizer(options.text_tokenizer, cfg.vocab))

    def _text(self, text: str) -> torch.Tensor:
        return padded_text(self.cfg, self.tokenizer.encode(text))

    def check(self, prompt: Prompt) -> list[str]:
        if prompt.first_frame is not None:
            raise ValueError("GLOBER samples from text alone: first_frame is not supported")
        ids = self.tokenizer.encode(self.text_format.text(prompt.text, self.options.duration))
        if len(ids) > self.cfg.text_length:
            return [
                f"text has {len(ids)} tokens: the first model.text_length={self.cfg.text_length} kept, as in training"
            ]
        return []

    def _generator(self, prompt: Prompt) -> torch.Generator:
        digest = hashlib.sha256(f"{self.options.seed}/{prompt.key}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") % 2**63)

    def sample(self, prompts: list[Prompt]) -> list[tuple[None, np.ndarray, dict]]:
        """(no codes, uint8 frames [F, H, W, 3], {"pixels": the same frames, kept losslessly as
        pixels.npy beside the mp4 / gif}) per prompt."""
        out = []
        param = next(self.model.parameters())
        for prompt in prompts:
            g = self._generator(prompt)
            noise = torch.randn(1, *self.cfg.global_shape, generator=g).to(param.device, param.dtype)
            draws = 1 if self.options.shared_frame_noise else self.num_frames
            frame_noise = torch.randn(1, draws, *self.cfg.latent_shape, generator=g)
            frame_noise = frame_noise.expand(1, self.num_frames, *self.cfg.latent_shape)
            text = self._text(self.text_format.text(prompt.text, self.options.duration))[None]
            uncond = self._text(self.text_format.uncond(self.options.duration))[None]
            v = self.sampler.global_features(text.to(param.device), uncond.to(param.device), noise)
            latents = self.sampler.frames(
                v, frame_indices(self.num_frames), frame_noise.to(param.device, param.dtype)
            )
            video = self.sampler.pixels(latents)[0]
            frames = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            pixels = frames.permute(0, 2, 3, 1).cpu().numpy()
            out.append((None, pixels, {"pixels": pixels}))
        return out

    def fps(self) -> float:
        return self.options.fps or max(self.num_frames - 1, 1) / self.options.duration

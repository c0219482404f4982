"""`cogvideo-sample --family hpdm`: HPDM's sampling options and the pipeline the sampling job
(cogvideo/sampling/job.py: resume, Ray actors, records, manifest) drives.

Each prompt is sampled with its own generator, seeded by (seed, prompt key): its video is the
same whatever the batch, worker or rerun that samples it. The caption takes the text format the
checkpoint was trained on (its duration prefix with `duration`); class presets take the class
name (or label) as the prompt.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cogvideo.diffusion.edm import Churn
from cogvideo.models.hpdm import pyramid
from cogvideo.models.hpdm.sampler import PyramidOptions, PyramidSampler
from cogvideo.precision import Precision
from cogvideo.sampling.models import join_parallel, load_eval_model, sampling_device, width_precision
from cogvideo.sampling.options import path_problems
from cogvideo.sampling.prompts import Prompt

log = logging.getLogger(__name__)


@dataclass
class HPDMSampleOptions:
    checkpoint: str = ""  # an HPDM model checkpoint (cogvideo-convert zero ...)
    text_tokenizer: str = ""  # text presets: the tokenizer the model trained with
    seed: int = 1234
    batch_size: int = 1  # prompts a worker takes at a time (each is sampled on its own generator)
    # full precision (the supplement: mixed precision converged worse); auto picks fp32 for this
    # family too (its auto_excludes), bf16 / fp16 only when asked for by name
    dtype: Precision = "fp32"
    device: str = "cpu"
    tensor_parallel: int = 1
    workers: int = 1
    steps: int = 128  # level 1 (the paper's); halved at every finer level
    overlap: float = 0.5  # share of a tile's height and width shared with the next (0.5: the paper's metrics)
    temporal_overlap: float = 0.5  # the same along time
    guidance: float = 1.0  # classifier-free guidance scale (1: conditional only)
    stochastic: bool = True  # level 1 with EDM's churn (the supplement turned it off for text-to-video)
    churn: Churn = field(default_factory=Churn)
    cache: bool = True  # the coarser levels' activation cache (False: recompute per tile, same video)
    output: list[int] = field(default_factory=list)  # [T, H, W] of the finest level; [] = the trained size
    duration: float = 4.0  # seconds, for the caption's duration prefix
    fps: float = 0.0  # output frame rate; 0 = frames / duration
    tiles_per_batch: int = 8
    # token grids of the coarser levels' context (1: the paper's; n: also their video rolled by
    # 1/n .. (n-1)/n of a token, the contexts averaged: cogvideo.models.hpdm.sampler.PyramidOptions)
    context_grids: int = 1

    def problems(self) -> list[str]:
        found = path_problems(
            required={"checkpoint": self.checkpoint},
            optional={"text_tokenizer": self.text_tokenizer},
        )
        if min(self.steps, self.batch_size, self.workers, self.tiles_per_batch, self.context_grids) < 1:
            found.append("steps, batch_size, workers, tiles_per_batch and context_grids must be >= 1")
        for key in ("overlap", "temporal_overlap"):
            if not 0 <= getattr(self, key) < 1:
                found.append(f"{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.output and (len(self.output) != 3 or min(self.output) < 1):
            found.append(f"output: [frames, height, width], got {self.output}")
        return found

    def pyramid(self) -> PyramidOptions:
        return PyramidOptions(
            steps=self.steps,
            overlap=self.overlap,
            temporal_overlap=self.temporal_overlap,
            guidance_scale=self.guidance,
            stochastic=self.stochastic,
            churn=self.churn,
            cache=self.cache,
            tiles_per_batch=self.tiles_per_batch,
            context_grids=self.context_grids,
        )


class HPDMPipeline:
    options_class = HPDMSampleOptions

    def __init__(self, options: HPDMSampleOptions, model, cfg, text_format, tokenizer):
        self.options, self.model, self.cfg = options, model, cfg
        self.text_format, self.tokenizer = text_format, tokenizer
        self.size = tuple(options.output) if options.output else None
        for level in range(1, cfg.num_levels + 1):  # any size the pyramid tiles: checked up front
            pyramid.tile_offsets(
                cfg, cfg.level_size(level, self.size), (options.temporal_overlap, options.overlap)
            )

    @classmethod
    def precision(cls, options: HPDMSampleOptions):
        """options.dtype resolved on this device (`auto`: by a product of the model's width)."""
        return width_precision(
            options.dtype, options.device, options.checkpoint, lambda cfg: cfg.tokens_per_patch
        )

    @classmethod
    def load(cls, options: HPDMSampleOptions) -> "HPDMPipeline":
        from cogvideo.checkpoint import load_text_format

        join_parallel(options.tensor_parallel)
        path, device = Path(options.checkpoint), sampling_device(options.device)
        model, cfg = load_eval_model(
            path,
            device,
            options.tensor_parallel,
            lambda cfg: (
                None
                if type(cfg).__name__ == "HPDMConfig"
                else f"holds a {cfg.name} model, not HPDM (cogvideo-sample --family)"
            ),
        )
        precision = cls.precision(options)
        log.info(precision.describe())
        tokenizer = None
        if cfg.condition == "text":
            from cogvideo.tokenizers.text import TextTokenizer

            if not options.text_tokenizer:
                raise ValueError(f"text_tokenizer: required, {path} is conditioned on captions")
            tokenizer = TextTokenizer(options.text_tokenizer, cfg.vocab)
        model = model.to(dtype=precision.dtype)
        return cls(options, model, cfg, load_text_format(path), tokenizer)

    def _text_ids(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(self.text_format.text(prompt.text, self.options.duration))

    def condition(self, prompt: Prompt) -> torch.Tensor:
        from cogvideo.models.hpdm import caption_pieces, class_label

        if self.cfg.condition == "class":
            label = class_label(self.cfg, prompt.text)
            if label is None:
                raise ValueError(f"prompt {prompt.text!r} is not a class of {self.cfg.name}")
            return torch.tensor(label)
        return caption_pieces(self.cfg, self._text_ids(prompt))  # the first text_length, as training keeps

    def check(self, prompt: Prompt) -> list[str]:
        if prompt.first_frame is not None:
            raise ValueError("HPDM samples from text or class alone: first_frame is not supported")
        self.condition(prompt)
        if self.cfg.condition == "text" and len(ids := self._text_ids(prompt)) > self.cfg.text_length:
            return [
                f"text has {len(ids)} tokens: the first model.text_length={self.cfg.text_length} kept, as in training"
            ]
        return []

    def _generator(self, prompt: Prompt) -> torch.Generator:
        digest = hashlib.sha256(f"{self.options.seed}/{prompt.key}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") % 2**63)

    def sample(self, prompts: list[Prompt]) -> list[tuple[None, np.ndarray, dict]]:
        """(no codes, uint8 frames [T, H, W, 3], the same frames as an array to keep: pixels.npy)
        per prompt: a pixel model's exact output (the mp4 and gif are lossy)."""
        from cogvideo.models.hpdm.loss import null_condition

        out = []
        for prompt in prompts:
            sampler = PyramidSampler(
                self.model, self.cfg, self.options.pyramid(), on_step=self._progress(prompt)
            )
            cond, null = self.condition(prompt)[None], null_condition(self.cfg)[None]
            video = sampler.sample(cond, null, self._generator(prompt), output=self.size)[0]
            frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            frames = frames.permute(1, 2, 3, 0).cpu().numpy()
            out.append((None, frames, {"pixels": frames}))
        return out

    def seam_contrast(self, frames: np.ndarray) -> tuple[float, float]:
        """How visible this sampler's finest tiles are in a video's frames [T, H, W, 3]: the mean
        difference between neighbouring pixels across tile borders and inside tiles."""
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).double()
        overlap = (self.options.temporal_overlap, self.options.overlap)
        return pyramid.seam_contrast(self.cfg, video, overlap)

    def _progress(self, prompt: Prompt):
        def report(level: int, step: int, steps: int) -> None:
            if step == steps or step % max(1, steps // 4) == 0:
                log.info(
                    "%s: level %d of %d, step %d/%d", prompt.key, level, self.cfg.num_levels, step, steps
                )

        return report

    def fps(self) -> float:
        frames = (self.size or self.cfg.video_size)[0]
        return self.options.fps or max(frames - 1, 1) / self.options.duration

"""Loads everything a sampling run needs once (stage models, tokenizers, strategies) and
turns a batch of prompts into decoded videos."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cogvideo.models.cogvideo.decode import DecodeProbe
from cogvideo.models.cogvideo.hierarchy import HierarchicalSampler, window_layout
from cogvideo.models.cogvideo.options import SampleOptions
from cogvideo.models.cogvideo.stage_model import StageModel
from cogvideo.precision import PrecisionChoice, choose_precision, probe_shape
from cogvideo.sampling.clusters import load_cluster_table
from cogvideo.sampling.models import join_parallel, load_eval_model, sampling_device
from cogvideo.sampling.options import check_options
from cogvideo.sampling.prompts import Prompt, TextEncoder
from cogvideo.sampling.strategies import make_strategy
from cogvideo.sdpa import fp32_attention

log = logging.getLogger(__name__)


def sampling_precision(options: SampleOptions) -> PrecisionChoice:
    """options.dtype resolved on this device; `auto` by the stage-1 model's own decoding timed
    in each precision (`DecodeProbe`) at the decode steps' row count (batch x 2 with guidance),
    besides a product of its width; collective under torch.distributed (rank 0's figures count)."""
    from cogvideo.checkpoint import load_model_config

    cfg = load_model_config(Path(options.stage1_checkpoint)).validate(options.tensor_parallel)
    device, rows = sampling_device(options.device), 2 * options.batch_size
    shape = probe_shape(rows, cfg.hidden_size, cfg.ffn_size // options.tensor_parallel)
    probe = DecodeProbe(cfg, device, rows)
    try:
        return choose_precision(
            options.dtype, device, shape, step=probe, attention=options.attention_precision
        )
    finally:
        probe.close()


def load_stage(path: Path, options: SampleOptions, expected_stage: str, dtype: torch.dtype) -> StageModel:
    from cogvideo.checkpoint import load_text_format

    model, cfg = load_eval_model(
        path,
        sampling_device(options.device),
        options.tensor_parallel,
        lambda cfg: (
            None if cfg.stage == expected_stage else f"holds a {cfg.stage} model, expected {expected_stage}"
        ),
    )
    return StageModel(model.to(dtype=dtype), cfg, load_text_format(path))


def _super_resolution(
    options: SampleOptions, stage1: StageModel, text_tokenizer, dtype: torch.dtype, image_tokenizer
):
    """The super-resolution stage of `options.sr_checkpoint`, checked to fit the stage-1 model; it
    decodes with `image_tokenizer` at its high-res grid (whose codebook is also sr_strategy.kind=mbr's
    code vectors); sr_text=uncond: every frame reads the checkpoint's guidance caption (no duration
    prefix, as a prompt has none)."""
    from cogvideo.checkpoint import load_text_format
    from cogvideo.models.dsr.sampler import SuperResolution, load_model

    model = load_model(options.sr_checkpoint, sampling_device(options.device), dtype, options.tensor_parallel)
    for key in ("vocab", "frame_tokens"):
        if getattr(model.cfg, key) != getattr(stage1.cfg, key):
            raise ValueError(
                f"model.{key} differs between {options.stage1_checkpoint} and {options.sr_checkpoint}: "
                f"the super-resolution model must read the video's frames and text"
            )
    labels = (
        load_cluster_table(options.cluster_table, model.cfg.vocab.num_image_tokens)
        if options.cluster_table
        else None
    )
    strategy = make_strategy(options.sr_strategy, labels, image_tokenizer.codebook())
    text = load_text_format(options.sr_checkpoint).uncond(None) if options.sr_text == "uncond" else None
    decoder = image_tokenizer.at_grid(model.cfg.high_frame_tokens)
    return SuperResolution(
        model, text_tokenizer, strategy, options.seed, options.sr_frames_per_batch, text, decoder
    )


class VideoPipeline:
    options_class = SampleOptions  # cogvideo-sample's options for this family

    def __init__(
        self,
        options: SampleOptions,
        stage1: StageModel,
        stage2: StageModel | None,
        text_tokenizer,
        image_tokenizer,
        cached: bool = True,
        frame0: StageModel | None = None,
        sr=None,
    ):
        """`sr`: a super-resolution stage (cogvideo.models.dsr.sampler.SuperResolution) run on
        every frame after the last stage; its high-res frames decode with `image_tokenizer` at
        its grid."""
        self.options, self.image_tokenizer, self.sr = options, image_tokenizer, sr
        self.encode = TextEncoder(text_tokenizer, stage1.cfg)
        num_codes = stage1.cfg.vocab.num_image_tokens
        labels = load_cluster_table(options.cluster_table, num_codes) if options.cluster_table else None
        code_vectors = image_tokenizer.codebook()  # for kind=mbr
        strategies = {
            name: make_strategy(getattr(options, f"{name}_strategy"), labels, code_vectors)
            for name in ("frame0", "stage1", "stage2")
        }
        self.sampler = HierarchicalSampler(stage1, stage2, options, self.encode, strategies, cached, frame0)
        self.precision: PrecisionChoice | None = None  # load() sets the run's; its attention is used

    @classmethod
    def precision(cls, options: SampleOptions) -> PrecisionChoice:
        """options.dtype resolved for this run (`sampling_precision`), after the options are
        checked and the processes joined (the probe is collective under torchrun)."""
        check_options(options)
        join_parallel(options.tensor_parallel)
        return sampling_precision(options)

    @classmethod
    def load(cls, options: SampleOptions) -> "VideoPipeline":
        """Checkpoints and tokenizers from the paths in `options`. Under torchrun the processes
        join the same parallel state as training: TP ranks share a model, DP groups split prompts."""
        from cogvideo.tokenizers.loading import load_image_tokenizer
        from cogvideo.tokenizers.text import TextTokenizer

        precision = cls.precision(options)
        log.info(precision.describe())
        if precision.warning:
            log.warning(precision.warning)
        dtype = precision.dtype
        stage1 = load_stage(Path(options.stage1_checkpoint), options, "stage1", dtype)
        stage2 = (
            load_stage(Path(options.stage2_checkpoint), options, "stage2", dtype)
            if options.stage2_checkpoint
            else None
        )
        frame0 = (
            load_stage(Path(options.frame0_checkpoint), options, "backbone", dtype)
            if options.frame0_checkpoint
            else None
        )
        for other, path in ((stage2, options.stage2_checkpoint), (frame0, options.frame0_checkpoint)):
            for key in ("vocab", "text_length", "frame_tokens"):
                if other is not None and getattr(stage1.cfg, key) != getattr(other.cfg, key):
                    raise ValueError(
                        f"model.{key} differs between {options.stage1_checkpoint} and {path}: "
                        f"the models must share tokenizers and frame layout"
                    )
        text = TextTokenizer(options.text_tokenizer, stage1.cfg.vocab)
        image = load_image_tokenizer(options.image_tokenizer, frame_size=stage1.cfg.frame_size)
        if image.codebook_size != stage1.cfg.vocab.num_image_tokens:
            raise ValueError(
                f"{options.image_tokenizer}: {image.codebook_size} codes, but {options.stage1_checkpoint} "
                f"models {stage1.cfg.vocab.num_image_tokens} image tokens"
            )
        sr = _super_resolution(options, stage1, text, dtype, image) if options.sr_checkpoint else None
        pipeline = cls(options, stage1, stage2, text, image, frame0=frame0, sr=sr)
        pipeline.precision = precision
        return pipeline

    def check(self, prompt: Prompt) -> list[str]:
        """Raise for a prompt this pipeline cannot sample (text budget, missing first frame);
        returns notes on what was changed to sample it (a dropped suffix)."""
        texts, notes = self.sampler.texts(prompt.text)
        for text in texts:
            self.encode(text)
        if self.sr is not None:
            self.sr.text_ids(prompt.text)
        if prompt.first_frame is not None and not Path(prompt.first_frame).is_file():
            raise FileNotFoundError(f"first_frame {prompt.first_frame} does not exist")
        return notes

    def _first_frame(self, path: str) -> torch.Tensor:
        from PIL import Image

        side = self.sampler.stage1.cfg.frame_size
        image = np.array(Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC))
        return torch.as_tensor(np.asarray(self.image_tokenizer.encode(image[None]))).reshape(-1)

    def sample(self, prompts: list[Prompt]) -> list[tuple[np.ndarray, np.ndarray, dict]]:
        """(image codes [T, h, w], decoded uint8 frames [T, H, W, 3], other arrays by name) per
        prompt; with super-resolution the codes and frames are the high-res ones and the
        low-res codes come as "codes_low"; a super-resolution stage that hands out pixels (a
        posterior mean) gives no codes, and its frames come as "pixels" too (pixels.npy)."""
        first = [None if p.first_frame is None else self._first_frame(p.first_frame) for p in prompts]
        with fp32_attention(self.precision is not None and self.precision.fp32_attention):
            codes = self.sampler.sample([p.text for p in prompts], first)
            side = self.sampler.stage1.cfg.frame_tokens
            codes = codes.reshape(len(prompts), -1, side, side).cpu()
            high = None if self.sr is None else self.sr([p.text for p in prompts], list(codes))
        if self.sr is None:
            return [(c, self._decode(self.image_tokenizer, c), {}) for c in codes.numpy()]
        if self.sr.pixels:
            return [
                (None, h.numpy(), {"codes_low": c.numpy(), "pixels": h.numpy()}) for h, c in zip(high, codes)
            ]
        return [
            (h.numpy(), self._decode(self.sr.decoder, h.numpy()), {"codes_low": c.numpy()})
            for h, c in zip(high, codes)
        ]

    @staticmethod
    def _decode(tokenizer, codes: np.ndarray) -> np.ndarray:
        return np.asarray(tokenizer.decode(codes), dtype=np.uint8)

    def num_frames(self) -> int:
        frames = self.sampler.stage1.cfg.num_frames
        if self.sampler.stage2 is not None:
            for _ in range(self.options.interpolation_levels):
                frames = window_layout(frames, self.sampler.stage2.cfg.num_frames)[1]
        return frames

    def fps(self) -> float:
        return self.options.fps or (self.num_frames() - 1) / self.options.duration

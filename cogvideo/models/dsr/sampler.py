"""DSR sampling as released (THUDM/CogVideo `sr_pipeline/direct_sr.py`, `dsr_sampling.py`): every
frame alone, with the raw prompt as text, through one forward and one parallel step over all
high-res slots: at every slot CogLM's cluster strategy on the float32 image logits (T = 1, the
top 6 of the codebook's clusters by probability mass, then a code inside the chosen one from
softmax(logits / 0.6)). Frames go through `frames_per_batch` at a time (the release: 12).

Each frame draws from its own generator (seeded by the run seed, the prompt and the frame's
index), so a frame's high-res codes do not depend on which frames share its batch. With a
posterior mean (`sr_strategy.kind=mean`, a project option) no code is drawn: each frame is the
expected decode of the model's distribution (the image tokenizer's `decode_mean` at the high-res
grid), and the stage hands out those pixels instead of codes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cogvideo.models.cogvideo.hierarchy import row_generator
from cogvideo.models.cogvideo.stage_model import gather_vocab
from cogvideo.models.dsr.config import DsrConfig
from cogvideo.models.dsr.layout import build_example
from cogvideo.sampling.models import load_eval_model
from cogvideo.sampling.strategies import PosteriorMean

log = logging.getLogger(__name__)


def load_model(path: str | Path, device: str, dtype: torch.dtype, tensor_parallel: int = 1):
    """A DSR checkpoint (ours) on `device` in `dtype`, in eval mode."""
    model, _ = load_eval_model(
        path,
        device,
        tensor_parallel,
        lambda cfg: (
            None
            if isinstance(cfg, DsrConfig)
            else f"holds a {type(cfg).__name__} model, not a DSR (super-resolution) model"
        ),
    )
    return model.to(dtype=dtype)


class SuperResolution:
    """Low-res frames' codes [T, r, r] + the prompt -> high-res codes [T, R, R], or with a
    PosteriorMean strategy high-res frames uint8 [T, H, W, 3] (`pixels` is then True). `decoder`:
    the image tokenizer at the high-res grid, which decodes the stage's output (needed for a
    PosteriorMean: its `decode_mean`). `text`: what every frame reads instead of its prompt
    (sampling's sr_text=uncond: the checkpoint's guidance caption); None: the raw prompt, as
    released. Each frame's generator is seeded by its prompt either way."""

    def __init__(
        self,
        model,
        text_tokenizer,
        strategy,
        seed: int,
        frames_per_batch: int = 12,
        text: str | None = None,
        decoder=None,
    ):
        self.model, self.cfg = model, model.cfg
        self.text_tokenizer, self.strategy, self.decoder = text_tokenizer, strategy, decoder
        self.seed, self.frames_per_batch, self.text = seed, frames_per_batch, text
        self.pixels = isinstance(strategy, PosteriorMean)
        if self.pixels and not hasattr(decoder, "decode_mean"):
            raise ValueError(
                "sr_strategy.kind=mean decodes the expected frame through the image tokenizer, "
                f"which {type(decoder).__name__} cannot do exactly: use the patch tokenizer, or kind=mbr"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def text_ids(self, prompt: str) -> list[int]:
        """The raw prompt's ids (no duration prefix, suffix or BOI), checked against the budget."""
        from cogvideo.sampling.prompts import TextBudgetError

        ids = list(self.text_tokenizer.encode(prompt))
        if len(ids) > self.cfg.text_length:
            raise TextBudgetError(
                f"text {prompt[:60]!r} is {len(ids)} text tokens; the super-resolution model's text "
                f"budget (model.text_length) is {self.cfg.text_length}: shorten the prompt"
            )
        return ids

    @torch.no_grad()
    def __call__(self, prompts: list[str], videos: list[torch.Tensor]) -> list[torch.Tensor]:
        """`videos[i]`: the codes [T_i, r, r] of prompt i's frames -> [T_i, R, R] (codes), or with
        `pixels` [T_i, H, W, 3] (uint8 frames)."""
        cfg = self.cfg
        frames = [(i, t) for i, video in enumerate(videos) for t in range(len(video))]
        texts = [self.text_ids(p if self.text is None else self.text) for p in prompts]
        side = cfg.high_frame_tokens
        shape, dtype = (
            ((self.decoder.frame_size,) * 2 + (3,), torch.uint8)
            if self.pixels
            else ((side, side), torch.long)
        )
        out = [torch.empty(len(v), *shape, dtype=dtype) for v in videos]
        for start in range(0, len(frames), self.frames_per_batch):
            chunk = frames[start : start + self.frames_per_batch]
            tokens = torch.stack(
                [
                    build_example(cfg, texts[i], videos[i][t], torch.zeros(cfg.high_tokens))[0]
                    for i, t in chunk
                ]
            )
            gens = [row_generator(self.seed, prompts[i], f"super-resolution/frame{t}") for i, t in chunk]
            codes = self.sample(tokens.to(self.device), gens).cpu()
            for (i, t), frame in zip(chunk, codes):
                out[i][t] = frame.view(shape)
            log.info("super-resolution: %d of %d frames", start + len(chunk), len(frames))
        return out

    def sample(self, tokens: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One forward, one parallel step: high-res codes [B, N] of DSR sequences [B, L] (with
        `pixels`: the expected frames, uint8 [B, H, W, 3]). The strategy runs frame by frame (its
        temporaries are several copies of the logits: at the published shape 0.3 GB a frame), each
        frame drawing from its own generator."""
        cfg = self.cfg
        logits = gather_vocab(self.model(tokens, image_only=True))[..., : cfg.vocab.num_image_tokens]
        N = cfg.high_tokens
        if self.pixels:
            side = cfg.high_frame_tokens
            return (
                torch.cat(
                    [
                        self.decoder.decode_mean(self.strategy.distribution(frame).view(1, side, side, -1))
                        for frame in logits
                    ]
                )
                .round_()
                .clamp_(0, 255)
                .to(torch.uint8)
                .cpu()
            )

        def draw(g: torch.Generator) -> torch.Tensor:
            return torch.rand(N, generator=g, dtype=torch.float64).to(tokens.device)

        return torch.stack(
            [self.strategy.sample(frame, lambda g=g: draw(g)) for frame, g in zip(logits, generators)]
        )

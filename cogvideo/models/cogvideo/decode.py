"""One decoding pass of a stage model: feed the text and the given frames, then sample the
target frames token by token, with classifier-free guidance.

`sample_frames` uses the KV cache (all given frames in one parallel pass, one step per
sampled token); `sample_frames_uncached` recomputes the whole time-ordered sequence at
every step and is the reference the cached path must match. `DecodeProbe` times that work in a
given precision, for `dtype: auto`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cogvideo.family import build_model
from cogvideo.models.cogvideo.stage_model import StageModel
from cogvideo.precision import PROBE_MAX_LAYERS, split_step_name, torch_dtype
from cogvideo.sdpa import fp32_attention

PROBE_TOKENS = 16  # single-token steps timed after the parallel pass


@dataclass
class DecodePass:
    text: torch.Tensor  # [B, text_length] conditional text ids, left-padded
    given: dict[int, torch.Tensor]  # frame index -> codes [B, n]
    targets: tuple[int, ...]  # frames to sample, in this order
    uncond_text: torch.Tensor | None = None  # [B, text_length]; None: no guidance
    guidance: float = 1.0  # lu + guidance * (lc - lu), with uncond_text
    temporal: bool = True
    text_bias: float = 0.0

    @property
    def guided(self) -> bool:
        return self.uncond_text is not None

    def rows_text(self) -> torch.Tensor:
        """Conditional rows, then the unconditional ones when guided."""
        return torch.cat([self.text, self.uncond_text]) if self.guided else self.text

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def rows(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([codes, codes]) if self.guided else codes


def _given_order(stage: StageModel, job: DecodePass) -> list[int]:
    order = [f for f in stage.cfg.sampling_order if f in job.given]
    return order + sorted(set(job.given) - set(order))


def sample_frames(stage: StageModel, job: DecodePass, strategy, generators) -> dict[int, torch.Tensor]:
    """KV-cached decoding; returns {target frame: codes [B, n]}."""
    n, device = stage.n, job.text.device
    cache = stage.new_cache(job.temporal)
    stage.text(job.rows_text(), cache, job.text_bias)
    if job.given:
        stage.given({f: job.rows(job.given[f]) for f in _given_order(stage, job)}, cache, job.text_bias)
    batch = len(job.text)
    out = {}
    for f in job.targets:
        codes = torch.empty(batch, n, dtype=torch.long, device=device)
        token = torch.full((batch, 1), stage.cfg.vocab.boi_id, dtype=torch.long, device=device)
        for p in range(n):
            logits = stage.step(job.rows(token), f, p, cache, job.text_bias)[:, -1]
            codes[:, p] = strategy(job.combine(logits), generators)
            token = codes[:, p : p + 1]
        out[f] = codes
    return out


def sample_frames_uncached(
    stage: StageModel, job: DecodePass, strategy, generators
) -> dict[int, torch.Tensor]:
    """The same pass by full forwards over the time-ordered sequence, one per sampled token.
    Not-yet-sampled tokens hold code 0; the attention mask keeps them out of every logit used."""
    n, t = stage.n, stage.cfg.text_length
    batch = len(job.text)
    frames = {f: codes.clone() for f, codes in job.given.items()}
    for f in job.targets:
        frames[f] = torch.zeros(batch, n, dtype=torch.long, device=job.text.device)
    if set(frames) != set(range(max(frames) + 1)):
        raise ValueError(f"uncached decoding needs frames 0..{max(frames)}, got {sorted(frames)}")
    text = job.rows_text()
    for f in job.targets:
        length = (
            max(f, *job.given) + 1 if job.given else f + 1
        )  # the shortest prefix holding every frame f sees
        for p in range(n):
            blocks = [job.rows(stage.frame_input(frames[g])) for g in range(length)]
            logits = stage.full(torch.cat([text, *blocks], dim=1), job.temporal, job.text_bias)
            frames[f][:, p] = strategy(job.combine(logits[:, t + f * n + p]), generators)
    return {f: frames[f] for f in job.targets}


class DecodeProbe:
    """``probe(name)`` runs the sampler's own work once as step ``name`` (a precision, or e.g.
    ``bf16_attention_fp32``: bf16 with attention computed in fp32), for ``dtype: auto`` and
    ``attention_precision: auto`` to time (`cogvideo.precision.choose_precision`): the text in
    one chunk, frame 0 given in one parallel pass, then PROBE_TOKENS single-token steps of frame
    1 with the KV cache, on `rows` decode rows, with the stage's model (TP shards included:
    collective under torch.distributed) cut to PROBE_MAX_LAYERS layers, random weights. A matmul
    predicts this poorly: small products, attention, casts and per-step latency dominate. A model
    per precision is built on first use."""

    def __init__(self, cfg, device: str, rows: int):
        layers = min(cfg.num_layers, PROBE_MAX_LAYERS)
        self.cfg = cfg.replace(num_layers=layers, activation_checkpointing=False)
        self.device, self.rows = device, rows
        self.stages: dict[str, StageModel] = {}

    def stage(self, name: str) -> StageModel:
        if name not in self.stages:
            torch.manual_seed(0)
            model = build_model(self.cfg, self.device).eval().to(torch_dtype(name))
            self.stages[name] = StageModel(model, self.cfg)
        return self.stages[name]

    def __call__(self, name: str) -> None:
        precision, in_fp32 = split_step_name(name)  # e.g. bf16_attention_fp32
        with fp32_attention(in_fp32):
            self._decode(self.stage(precision))

    def _decode(self, stage: StageModel) -> None:
        cfg = self.cfg
        vocab, generator = cfg.vocab, torch.Generator().manual_seed(0)
        text = torch.randint(
            vocab.text_offset,
            vocab.text_offset + vocab.num_text_tokens,
            (self.rows, cfg.text_length),
            generator=generator,
        ).to(self.device)
        codes = torch.randint(0, vocab.num_image_tokens, (self.rows, stage.n), generator=generator).to(
            self.device
        )
        target = min(1, cfg.num_frames - 1)
        cache = stage.new_cache(temporal=target > 0)
        stage.text(text, cache, 0.0)
        if target:
            stage.given({0: codes}, cache, 0.0)
        for position in range(min(PROBE_TOKENS, stage.n)):
            stage.step(codes[:, position : position + 1], target, position, cache, 0.0)

    def close(self) -> None:
        self.stages.clear()

"""A stage model as the sampler sees it: chunked decoding with a KV cache, and the full
(uncached) forward, both returning image-code logits gathered over the TP group."""

from __future__ import annotations

import torch

from cogvideo import parallel
from cogvideo.models.cogvideo.config import ModelConfig
from cogvideo.models.cogvideo.sequence import TokenMeta
from cogvideo.text_format import TextFormat


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel shards [..., vocab/tp] -> the full vocabulary on every TP rank."""
    if parallel.tp_size() == 1:
        return logits
    shards = [torch.empty_like(logits) for _ in range(parallel.tp_size())]
    torch.distributed.all_gather(shards, logits.contiguous(), group=parallel.tp_group())
    return torch.cat(shards, dim=-1)


class StageModel:
    def __init__(self, model, cfg: ModelConfig, text_format: TextFormat = TextFormat()):
        self.model, self.cfg = model, cfg
        self.text_format = text_format  # the one it was trained on (its checkpoint's)
        self.n = cfg.tokens_per_frame

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_vocab(logits)[..., : self.cfg.vocab.num_image_tokens].float()

    def frame_input(self, codes: torch.Tensor) -> torch.Tensor:
        """A frame's codes [B, n] as fed to the model: [BOI, t0 .. t(n-2)]."""
        boi = torch.full_like(codes[:, :1], self.cfg.vocab.boi_id)
        return torch.cat([boi, codes[:, :-1]], dim=1)

    def new_cache(self, temporal: bool):
        """temporal=False: the backbone alone (CogView2 behaviour, used for frame 0)."""
        return self.model.new_cache(temporal=temporal)

    @torch.no_grad()
    def text(self, ids: torch.Tensor, cache, text_bias: float) -> None:
        self.model.forward_chunk(ids, TokenMeta.text(self.cfg), cache, text_bias=text_bias, logits=False)

    @torch.no_grad()
    def given(self, frames: dict[int, torch.Tensor], cache, text_bias: float) -> None:
        """Whole given frames {index: codes [B, n]} in one parallel pass (they may see each other)."""
        order = list(frames)
        meta = TokenMeta.cat([TokenMeta.of_frame(self.cfg, f) for f in order])
        tokens = torch.cat([self.frame_input(frames[f]) for f in order], dim=1)
        self.model.forward_chunk(tokens, meta, cache, text_bias=text_bias, logits=False)

    @torch.no_grad()
    def step(
        self, tokens: torch.Tensor, frame_index: int, start: int, cache, text_bias: float
    ) -> torch.Tensor:
        """Feed positions [start, start + l) of frame `frame_index`; image logits [B, l, K]."""
        meta = TokenMeta.of_frame(self.cfg, frame_index, start, start + tokens.shape[1])
        return self._image_logits(self.model.forward_chunk(tokens, meta, cache, text_bias=text_bias))

    @torch.no_grad()
    def full(self, tokens: torch.Tensor, temporal: bool, text_bias: float) -> torch.Tensor:
        """The uncached forward over a time-ordered sequence; image logits [B, L, K]."""
        return self._image_logits(self.model(tokens, temporal=temporal, text_bias=text_bias))

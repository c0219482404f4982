"""A stage model as the sampler sees it: chunked decoding with a KV cache, and the full
(uncached) forward, both returning image-code logits gathered over the TP group."""
from __future__ import annotations

import torch

from cogvideo.config import ModelConfig


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel shards [..., vocab/tp] -> the full vocabulary on every TP rank."""
    from cogvideo import parallel

    if parallel.tp_size() == 1:
        return logits
    shards = [torch.empty_like(logits) for _ in range(parallel.tp_size())]
    torch.distributed.all_gather(shards, logits.contiguous(), group=parallel.tp_group())
    return torch.cat(shards, dim=-1)


class StageModel:
    def __init__(self, model, cfg: ModelConfig):
        self.model, self.cfg = model, cfg
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

    def new_cache(self):
        return self.model.new_cache()

    @torch.no_grad()
    def text(self, ids: torch.Tensor, cache, temporal: bool, text_bias: float) -> None:
        from cogvideo.sequence import TokenMeta

        self.model.forward_chunk(ids, TokenMeta.text(self.cfg), cache, temporal=temporal, text_bias=text_bias)

    @torch.no_grad()
    def frame(self, tokens: torch.Tensor, frame_index: int, start: int, cache, temporal: bool,
              text_bias: float) -> torch.Tensor:
        """Feed positions [start, start + l) of frame `frame_index`; image logits [B, l, K]."""
        from cogvideo.sequence import TokenMeta

        meta = TokenMeta.frame(self.cfg, frame_index, start, start + tokens.shape[1])
        logits = self.model.forward_chunk(tokens, meta, cache, temporal=temporal, text_bias=text_bias)
        return self._image_logits(logits)

    @torch.no_grad()
    def full(self, tokens: torch.Tensor, temporal: bool, text_bias: float) -> torch.Tensor:
        """The uncached forward over a time-ordered sequence; image logits [B, L, K]."""
        return self._image_logits(self.model(tokens, temporal=temporal, text_bias=text_bias))

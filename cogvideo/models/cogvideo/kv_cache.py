"""KV cache for incremental decoding.

The spatial channel only ever needs the text and the frame being generated, so its buffer
holds text_length + tokens_per_frame entries and restarts its frame part when a new frame
begins. The temporal channel needs text + every frame fed so far. The text attends
bidirectionally (as released), so it is cached in one pass. Token metadata (frame, pos, pad)
is kept once for all layers; each layer keeps its own K/V buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cogvideo.models.cogvideo.config import ModelConfig
from cogvideo.models.cogvideo.sequence import TEXT, TokenMeta


class _Buffer:
    """Preallocated K/V storage [B, H, capacity, d] for every layer, plus key metadata."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.frame = torch.full((capacity,), TEXT, dtype=torch.long)
        self.pos = torch.zeros(capacity, dtype=torch.long)
        self.pad: torch.Tensor | None = None  # [B, capacity]
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def meta(self, stop: int) -> TokenMeta:
        return TokenMeta(self.frame[:stop], self.pos[:stop])

    def write_meta(self, start: int, meta: TokenMeta, pad: torch.Tensor) -> None:
        stop = start + len(meta)
        if stop > self.capacity:
            raise ValueError(f"KV cache overflow: {stop} entries > capacity {self.capacity}")
        if self.pad is None:
            self.pad = torch.zeros(pad.shape[0], self.capacity, dtype=torch.bool, device=pad.device)
        self.frame[start:stop], self.pos[start:stop] = meta.frame.cpu(), meta.pos.cpu()
        self.pad[:, start:stop] = pad

    def write_kv(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer not in self.keys:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        stop = start + k.shape[2]
        self.keys[layer][:, :, start:stop] = k
        self.values[layer][:, :, start:stop] = v

    def read(self, layer: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop]


@dataclass
class ChunkPlan:
    """Where one chunk's K/V go and which keys (with metadata) its queries read."""

    spatial_start: int  # single-frame or text chunk: written at [start, stop) of the buffer
    spatial_stop: int
    spatial_concat: slice | None  # multi-frame chunk: keys = text + the chunk; this segment is kept
    spatial_keys: TokenMeta
    spatial_pad: torch.Tensor
    whole_frames: list[int] | None = None  # the chunk is these whole frames right after the text
    temporal_start: int = 0
    temporal_stop: int = 0


class KVCache:
    """Feed the whole text first in one chunk (it is a bidirectional block), then frames: one
    frame per chunk, or several whole frames in one chunk (given frames that must see each
    other, e.g. stage-2 frames 0, 2, 4)."""

    def __init__(self, cfg: ModelConfig, temporal: bool = True):
        self.cfg = cfg
        self.spatial = _Buffer(cfg.text_length + cfg.tokens_per_frame)
        self.temporal = _Buffer(cfg.seq_length) if temporal and cfg.has_temporal else None
        self.text_length = 0
        self.current_frame: int | None = None

    def plan(self, meta: TokenMeta, pad: torch.Tensor) -> ChunkPlan:
        frames = meta.frame.unique_consecutive().tolist()
        right_after_text = frames != [TEXT] and self.current_frame is None
        if frames == [TEXT]:
            if self.text_length or self.current_frame is not None:
                raise ValueError(
                    "feed the text once, in one chunk, before any frame (text attends "
                    "bidirectionally and its position ids depend on the pad count)"
                )
            self.text_length = len(meta)
            plan = self._single(0, meta, pad)
        elif TEXT in frames:
            raise ValueError("a chunk holds either text or frame tokens, not both")
        elif self.text_length == 0:
            raise ValueError("feed the text before any frame")
        elif len(set(frames)) == 1:
            if frames[0] != self.current_frame:
                self.spatial.length = self.text_length
                self.current_frame = frames[0]
            plan = self._single(self.spatial.length, meta, pad)
        else:
            last = int((meta.frame != meta.frame[-1]).nonzero().max()) + 1
            segment = slice(last, len(meta))
            self.current_frame = frames[-1]
            self.spatial.write_meta(self.text_length, meta[segment], pad[:, segment])
            self.spatial.length = self.text_length + (len(meta) - last)
            text = self.spatial.meta(self.text_length)
            plan = ChunkPlan(
                0,
                0,
                segment,
                TokenMeta.cat([text, meta]),
                torch.cat([self.spatial.pad[:, : self.text_length], pad], dim=1),
            )
        if right_after_text and self._whole(meta, frames):
            plan.whole_frames = frames
        if self.temporal is not None:
            plan.temporal_start = self.temporal.length
            self.temporal.write_meta(plan.temporal_start, meta, pad)
            self.temporal.length = plan.temporal_stop = plan.temporal_start + len(meta)
        return plan

    def _whole(self, meta: TokenMeta, frames: list[int]) -> bool:
        """Is the chunk whole frames, each once, positions 0..n-1 in order?"""
        n = self.cfg.tokens_per_frame
        if len(set(frames)) != len(frames) or len(meta) != len(frames) * n:
            return False
        layout = TokenMeta.cat([TokenMeta.of_frame(self.cfg, f) for f in frames])
        return torch.equal(meta.frame.cpu(), layout.frame) and torch.equal(meta.pos.cpu(), layout.pos)

    def _single(self, start: int, meta: TokenMeta, pad: torch.Tensor) -> ChunkPlan:
        self.spatial.write_meta(start, meta, pad)
        self.spatial.length = stop = start + len(meta)
        return ChunkPlan(start, stop, None, self.spatial.meta(stop), self.spatial.pad[:, :stop])

    def spatial_kv(self, layer: int, plan: ChunkPlan, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's chunk K/V and return the spatial keys/values its queries read."""
        if plan.spatial_concat is None:
            self.spatial.write_kv(layer, plan.spatial_start, k, v)
            return self.spatial.read(layer, plan.spatial_stop)
        text_k, text_v = self.spatial.read(layer, self.text_length)
        segment = plan.spatial_concat
        self.spatial.write_kv(layer, self.text_length, k[:, :, segment], v[:, :, segment])
        return torch.cat([text_k, k], dim=2), torch.cat([text_v, v], dim=2)

    def temporal_kv(self, layer: int, plan: ChunkPlan, k: torch.Tensor, v: torch.Tensor):
        self.temporal.write_kv(layer, plan.temporal_start, k, v)
        return self.temporal.read(layer, plan.temporal_stop)

    def temporal_keys(self, plan: ChunkPlan) -> tuple[TokenMeta, torch.Tensor]:
        return self.temporal.meta(plan.temporal_stop), self.temporal.pad[:, : plan.temporal_stop]

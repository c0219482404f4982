"""Blocked attention over whole frames laid out after the text.

Each query only sees the text and a small block of frame tokens: its own frame (spatial
channel), every earlier token (stage-1 temporal channel) or its 3D Swin window (stage-2
temporal channel). The blocks are gathered into the batch dimension, so no dense mask over the
whole sequence is built. The full forward and the KV-cached pass over given frames (e.g.
stage-2 frames 0, 2, 4 right after the text) both run these; the masks come from `visible()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cogvideo.models.cogvideo.attention import attend, kernel_mask, window_gather_index
from cogvideo.models.cogvideo.config import ModelConfig
from cogvideo.models.cogvideo.sequence import TEXT, TokenMeta, layer_shift, visible


def with_pads(vis: torch.Tensor, key_pad: torch.Tensor, query_pad: torch.Tensor) -> torch.Tensor:
    """vis [q, k] & key not a pad -> [B, 1, q, k]. As in the release (pads masked by a large
    negative score, not -inf), a pad query of a prompt with no real text sees the pads."""
    seen = vis & ~key_pad[:, None, None, :]
    blind = query_pad[:, None, :, None] & ~seen.any(dim=-1, keepdim=True)
    return seen | (vis & blind)


def text_bias_scores(mask: torch.Tensor, q: TokenMeta, k: TokenMeta, bias: float) -> torch.Tensor | None:
    """CogView2's log attention weights: +bias on text keys seen from frame queries."""
    if not bias:
        return None
    cells = ((q.frame != TEXT)[:, None] & (k.frame == TEXT)[None, :]).to(torch.float32) * bias
    return cells.expand(mask.shape[-2:]).to(mask.device)


def attention_shifts(cfg: ModelConfig) -> set[int]:
    """The temporal window shifts the layers use (stage 1: no windows, shift 0)."""
    if cfg.stage != "stage2":
        return {0}
    return {layer_shift(cfg, i) for i in range(cfg.num_layers)}


@dataclass
class FrameBlocks:
    """Masks (bool, True = attend), text biases (additive, or None) and gather indices for whole
    frames after the text, built once and shared by all layers. Keys are [text; frames]."""

    spatial: torch.Tensor  # [B*nf, 1, n, T+n]
    spatial_keys: torch.Tensor  # [nf*(T+n)]: text, then frame f, for each frame
    spatial_bias: torch.Tensor | None
    temporal: dict[
        int, torch.Tensor
    ]  # shift -> stage 1: [B, 1, nf*n, T+nf*n]; stage 2: [B*nW, 1, per, T+per]
    temporal_bias: dict[int, torch.Tensor | None]
    # stage 2, per shift: frame tokens of each window [nW*per], window keys [nW*(T+per)], and
    # the inverse of the first (window order -> frame order)
    windows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def for_kernel(self, dtype: torch.dtype, pb_relax_alpha: float) -> None:
        """Masks and text biases as the attention kernel adds them to the scores, in `dtype`,
        once for every layer (`kernel_mask`)."""
        self.spatial, self.spatial_bias = kernel_mask(self.spatial, self.spatial_bias, dtype, pb_relax_alpha)
        for shift in self.temporal:
            self.temporal[shift], self.temporal_bias[shift] = kernel_mask(
                self.temporal[shift], self.temporal_bias[shift], dtype, pb_relax_alpha
            )


def _block_keys(T: int, blocks: torch.Tensor) -> torch.Tensor:
    """blocks [nb, m] frame-token indices -> [nb*(T+m)] indices into [text; frames]: text, block."""
    text = torch.arange(T).expand(blocks.shape[0], T)
    return torch.cat([text, T + blocks], dim=1).flatten()


def _block_visibility(
    cfg: ModelConfig, text: TokenMeta, meta: TokenMeta, blocks: int, channel: str, shift: int = 0
) -> torch.Tensor:
    """visible() of each of `blocks` equal blocks of `meta` over [text; its own block]: [nb, m, T+m],
    computed block by block (never the whole [L, T+L] of which it is the block diagonal)."""
    m = len(meta) // blocks
    parts = [meta[b * m : (b + 1) * m] for b in range(blocks)]
    return torch.stack([visible(cfg, part, TokenMeta.cat([text, part]), channel, shift) for part in parts])


def frame_blocks(
    cfg: ModelConfig,
    text: TokenMeta,
    text_pad: torch.Tensor,
    frames: list[int],
    text_bias: float,
    temporal: bool = True,
) -> FrameBlocks:
    """Blocks for `frames` (whole, in this order) after `text` [T] with pads `text_pad` [B, T]."""
    device, n = text_pad.device, cfg.tokens_per_frame
    T, B, nf = len(text), text_pad.shape[0], len(frames)
    meta = TokenMeta.cat([TokenMeta.of_frame(cfg, f) for f in frames])
    key_pad = torch.cat([text_pad, text_pad.new_zeros(B, nf * n)], 1)  # frame tokens are never pads

    def blocked_mask(vis, m):  # [nb, m, T+m] -> [B*nb, 1, m, T+m], text pads masked
        return (vis.to(device)[None] & ~key_pad[:, None, None, : T + m]).reshape(-1, 1, m, T + m)

    def bias(vis, queries):  # frame queries, keys [text; ...]: the same columns in every block
        return text_bias_scores(vis, queries, TokenMeta.cat([text, queries]), text_bias)

    frame_order = torch.arange(nf * n).reshape(nf, n)
    vis = _block_visibility(cfg, text, meta, nf, "spatial")
    blocks = FrameBlocks(
        blocked_mask(vis, n), _block_keys(T, frame_order).to(device), bias(vis[0], meta[:n]), {}, {}, {}
    )
    if not (temporal and cfg.has_temporal):
        return blocks
    if cfg.stage == "stage1":  # causal in time: one block of all frames
        vis = visible(cfg, meta, TokenMeta.cat([text, meta]), "temporal").to(device)
        blocks.temporal[0] = (vis & ~key_pad[:, None, :])[:, None]
        blocks.temporal_bias[0] = bias(vis, meta)
        return blocks
    for shift in attention_shifts(cfg):
        index, wmeta = window_gather_index(cfg, frames, shift)
        nW, per = index.shape
        vis = _block_visibility(cfg, text, wmeta, nW, "temporal", shift)
        blocks.temporal[shift] = blocked_mask(vis, per)
        blocks.temporal_bias[shift] = bias(vis[0], wmeta[:per])
        order = index.flatten()
        blocks.windows[shift] = (
            order.to(device),
            _block_keys(T, index).to(device),
            order.argsort().to(device),
        )
    return blocks


def _gather(t: torch.Tensor, index: torch.Tensor, blocks: int) -> torch.Tensor:
    """Tokens `index` ([nb*m], block after block) of t [B, H, L, d] as [B*nb, H, m, d], copied
    once into token-major order, which SDPA reads as it is. index_select, not t[:, index]: its
    backward is an index_add, where indexing's is an accumulating index_put that took 5x as long
    on the CPU (small preset, fp32: 1.17 vs 0.22 ms forward + backward, the same gradient)."""
    B, H, _, d = t.shape
    return t.transpose(1, 2).index_select(1, index).reshape(B * blocks, -1, H, d).transpose(1, 2)


def _ungather(out: torch.Tensor, batch: int, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """[B*nb, H, m, d] blocks -> [B, H, nb*m, d] (token-major, so the output projection reads it
    without a copy), reordered by `inverse` when the blocks were gathered out of order."""
    _, H, _, d = out.shape
    tokens = out.transpose(1, 2).reshape(batch, -1, H, d)
    return (tokens if inverse is None else tokens.index_select(1, inverse)).transpose(1, 2)


def spatial_attention(
    q, k, v, blocks: FrameBlocks, pb_relax_alpha: float, dropout: float = 0.0
) -> torch.Tensor:
    """q [B, H, nf*n, d] frame queries; k, v [B, H, T + nf*n, d] -> [B, H, nf*n, d]."""
    B, H, _, d = q.shape
    nf = blocks.spatial.shape[0] // B
    queries = q.transpose(1, 2).reshape(B * nf, -1, H, d).transpose(1, 2)
    out = attend(
        queries,
        _gather(k, blocks.spatial_keys, nf),
        _gather(v, blocks.spatial_keys, nf),
        blocks.spatial,
        blocks.spatial_bias,
        pb_relax_alpha,
        dropout,
    )
    return _ungather(out, B)


def temporal_attention(
    q, k, v, blocks: FrameBlocks, shift: int, pb_relax_alpha: float, dropout: float = 0.0
) -> torch.Tensor:
    """q [B, H, nf*n, d] frame queries; k, v [B, H, T + nf*n, d] -> [B, H, nf*n, d]."""
    if shift not in blocks.windows:  # stage 1: one block
        return attend(q, k, v, blocks.temporal[shift], blocks.temporal_bias[shift], pb_relax_alpha, dropout)
    order, keys, inverse = blocks.windows[shift]
    nW = blocks.temporal[shift].shape[0] // q.shape[0]
    out = attend(
        _gather(q, order, nW),
        _gather(k, keys, nW),
        _gather(v, keys, nW),
        blocks.temporal[shift],
        blocks.temporal_bias[shift],
        pb_relax_alpha,
        dropout,
    )
    return _ungather(out, q.shape[0], inverse)

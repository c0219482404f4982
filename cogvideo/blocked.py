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

from cogvideo.attention import attend, window_gather_index
from cogvideo.config import ModelConfig
from cogvideo.sequence import TEXT, TokenMeta, layer_shift, visible


def with_pads(vis: torch.Tensor, key_pad: torch.Tensor, query_pad: torch.Tensor) -> torch.Tensor:
    """vis [..., q, k] & key not a pad; pad queries (ignored rows) may see pads to stay finite."""
    return vis & (~key_pad[:, None, None, :] | query_pad[:, None, :, None])


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
    """Masks (bool, True = attend) and text biases (additive, or None) for whole frames after
    the text, built once and shared by all layers. Keys of every call are [text; frames]."""

    text_length: int
    spatial: torch.Tensor  # [B*nf, 1, n, T+n]
    spatial_bias: torch.Tensor | None
    temporal: dict[int, torch.Tensor]  # shift -> stage 1: [B, 1, nf*n, T+nf*n]; stage 2: [B*nW, 1, per, T+per]
    temporal_bias: dict[int, torch.Tensor | None]
    window_index: dict[int, torch.Tensor]  # stage 2: shift -> [nW, per] gather index into the frame tokens


def frame_blocks(cfg: ModelConfig, text: TokenMeta, text_pad: torch.Tensor, frames: list[int],
                 text_bias: float, temporal: bool = True) -> FrameBlocks:
    """Blocks for `frames` (whole, in this order) after `text` [T] with pads `text_pad` [B, T]."""
    device, n = text_pad.device, cfg.tokens_per_frame
    T, B = len(text), text_pad.shape[0]

    def keys(part: TokenMeta):
        """Visibility of `part` over [text; part], text pads masked."""
        return TokenMeta.cat([text, part]), torch.cat([text_pad, text_pad.new_zeros(B, len(part))], 1)

    frame_masks = []
    for f in frames:
        meta = TokenMeta.of_frame(cfg, f)
        key_meta, key_pad = keys(meta)
        vis = visible(cfg, meta, key_meta, "spatial").to(device)
        frame_masks.append(vis & ~key_pad[:, None, :])
    spatial = torch.stack(frame_masks, 1).reshape(B * len(frames), 1, n, T + n)
    blocks = FrameBlocks(T, spatial, text_bias_scores(vis, meta, key_meta, text_bias), {}, {}, {})
    if not (temporal and cfg.has_temporal):
        return blocks
    if cfg.stage == "stage1":
        meta = TokenMeta.cat([TokenMeta.of_frame(cfg, f) for f in frames])
        key_meta, key_pad = keys(meta)
        vis = visible(cfg, meta, key_meta, "temporal").to(device)
        blocks.temporal[0] = (vis & ~key_pad[:, None, :])[:, None]
        blocks.temporal_bias[0] = text_bias_scores(vis, meta, key_meta, text_bias)
        return blocks
    for shift in attention_shifts(cfg):
        index, meta = window_gather_index(cfg, frames, shift)
        nW, per = index.shape
        windows = [meta[w * per:(w + 1) * per] for w in range(nW)]
        key_meta, key_pad = keys(windows[0])  # every window has the same text-then-frames columns
        vis = torch.stack([visible(cfg, q, TokenMeta.cat([text, q]), "temporal", shift) for q in windows]).to(device)
        blocks.temporal[shift] = (vis[None] & ~key_pad[:, None, None, :]).reshape(B * nW, 1, per, T + per)
        blocks.temporal_bias[shift] = text_bias_scores(vis[0], windows[0], key_meta, text_bias)
        blocks.window_index[shift] = index.to(device)
    return blocks


def _with_text(t: torch.Tensor, blocks: torch.Tensor, T: int) -> torch.Tensor:
    """Prepend the text part t[:, :, :T] [B, H, T, d] to each of `blocks` [B*nb, H, m, d]."""
    B, H, _, d = t.shape
    nb = blocks.shape[0] // B
    text = t[:, :, :T].unsqueeze(1).expand(B, nb, H, T, d).reshape(B * nb, H, T, d)
    return torch.cat([text, blocks], dim=2)


def spatial_attention(q, k, v, blocks: FrameBlocks, pb: float) -> torch.Tensor:
    """q [B, H, nf*n, d] frame queries; k, v [B, H, T + nf*n, d] -> [B, H, nf*n, d]."""
    B, H, L, d = q.shape
    nf = blocks.spatial.shape[0] // B
    n, T = L // nf, blocks.text_length

    def per_frame(t):  # [B, H, nf*n, d] -> [B*nf, H, n, d]
        return t.reshape(B, H, nf, n, d).transpose(1, 2).reshape(B * nf, H, n, d)

    out = attend(per_frame(q), _with_text(k, per_frame(k[:, :, T:]), T), _with_text(v, per_frame(v[:, :, T:]), T),
                 blocks.spatial, blocks.spatial_bias, pb)
    return out.reshape(B, nf, H, n, d).transpose(1, 2).reshape(B, H, L, d)


def temporal_attention(q, k, v, blocks: FrameBlocks, shift: int, pb: float) -> torch.Tensor:
    """q [B, H, nf*n, d] frame queries; k, v [B, H, T + nf*n, d] -> [B, H, nf*n, d]."""
    if shift not in blocks.window_index:  # stage 1: causal in time over [text; frames]
        return attend(q, k, v, blocks.temporal[shift], blocks.temporal_bias[shift], pb)
    index = blocks.window_index[shift]
    B, H, L, d = q.shape
    nW, per = index.shape
    T = blocks.text_length

    def windows(t):  # frame tokens gathered into windows: [B*nW, H, per, d]
        return t[:, :, index.flatten()].reshape(B, H, nW, per, d).transpose(1, 2).reshape(B * nW, H, per, d)

    out = attend(windows(q), _with_text(k, windows(k[:, :, T:]), T), _with_text(v, windows(v[:, :, T:]), T),
                 blocks.temporal[shift], blocks.temporal_bias[shift], pb)
    out = out.reshape(B, nW, H, per, d).transpose(1, 2).reshape(B, H, L, d)
    return torch.empty_like(out).index_copy_(2, index.flatten(), out)

"""Attention kernels for the two channels.

`attend` runs `scaled_dot_product_attention` (fused kernels keep the softmax in fp32), or, for
fp16 without them, CogView's PB-Relax form. The blocked layouts below gather the tokens each
query may see into the batch dimension (text + one frame for the spatial channel, text + one
3D window for the stage-2 temporal channel) so that no dense LxL mask is ever built.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cogvideo.config import ModelConfig
from cogvideo.sequence import TokenMeta


def attend(q, k, v, mask: torch.Tensor, bias: torch.Tensor | None = None, pb_relax_alpha: float = 0.0):
    """q [N, H, Lq, d], k/v [N, H, Lk, d]; mask bool broadcastable to [N, H, Lq, Lk] (True = may
    attend); bias: additive scores of the same broadcast shape or None."""
    if q.dtype == torch.float16 and pb_relax_alpha and q.device.type == "cpu":
        return pb_relax_attention(q, k, v, mask, bias, pb_relax_alpha)
    attn_mask = mask
    if bias is not None:
        attn_mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf")) + bias
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def pb_relax_attention(q, k, v, mask, bias, alpha: float):
    """softmax(QK^T/sqrt(d)) computed as softmax((QK^T/(alpha sqrt(d)) - max) * alpha): the
    scores never exceed fp16 range (CogView, "PB-Relax")."""
    scores = torch.matmul(q / (alpha * math.sqrt(q.shape[-1])), k.transpose(-1, -2))
    scores = (scores - scores.amax(dim=-1, keepdim=True).detach()) * alpha
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def window_gather_index(cfg: ModelConfig, num_frames: int, shift: int) -> tuple[torch.Tensor, TokenMeta]:
    """Index [windows, num_frames * w * w] into the flattened frame tokens, gathering each
    shifted 3D window (all frames x w x w positions), and the TokenMeta of the gathered order.
    The roll by `shift` puts the wrapped strips into the last window; `visible()` (region mask)
    keeps them apart."""
    side, w, n = cfg.frame_tokens, cfg.window_size, cfg.tokens_per_frame
    grid = torch.arange(n).reshape(side, side).roll(shifts=(-shift, -shift), dims=(0, 1))
    windows = grid.reshape(side // w, w, side // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    frames = torch.arange(num_frames)
    index = (frames[None, :, None] * n + windows[:, None, :]).reshape(windows.shape[0], -1)
    meta = TokenMeta(frame=(index // n).flatten(), pos=(index % n).flatten())
    return index, meta


"""Attention kernels for the two channels.

`attend` runs `scaled_dot_product_attention` (`cogvideo.sdpa`; fused kernels keep the softmax
in fp32), or, for fp16 without them, CogView's PB-Relax form. Its dropout acts on this TP rank's
share of the heads, so under TP it draws from the rank's own RNG state
(`cogvideo.parallel.model_parallel_rng`), as Megatron's and SAT's attention do.
`window_gather_index` lays out the stage-2 3D windows that cogvideo/models/cogvideo/blocked.py
gathers into the batch dimension.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cogvideo import parallel
from cogvideo.models.cogvideo.config import ModelConfig
from cogvideo.models.cogvideo.sequence import TokenMeta
from cogvideo.sdpa import sdpa


def attend(
    q,
    k,
    v,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    pb_relax_alpha: float = 0.0,
    dropout: float = 0.0,
):
    """q [N, H, Lq, d], k/v [N, H, Lk, d]; mask broadcastable to [N, H, Lq, Lk]: bool (True = may
    attend) with bias (additive scores of the same broadcast shape) or None, or already the
    kernel's additive mask (`kernel_mask`, bias None); dropout: on the attention probabilities
    (training only; the caller passes 0 in eval), drawn from this TP rank's model-parallel RNG
    state."""
    with parallel.model_parallel_rng(q.device) if dropout else contextlib.nullcontext():
        if pb_relaxed(q.dtype, pb_relax_alpha, q.device):
            return pb_relax_attention(q, k, v, mask, bias, pb_relax_alpha, dropout)
        attn_mask, _ = kernel_mask(mask, bias, q.dtype, pb_relax_alpha) if bias is not None else (mask, None)
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout)


def pb_relaxed(dtype: torch.dtype, pb_relax_alpha: float, device: torch.device) -> bool:
    """fp16 on the CPU runs CogView's PB-Relax form (its fused kernels are missing there)."""
    return dtype == torch.float16 and bool(pb_relax_alpha) and device.type == "cpu"


def kernel_mask(
    mask: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, pb_relax_alpha: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask, bias) as `attend` passes them to its kernel: one additive mask in `dtype` (0 where
    the bool mask attends, -inf elsewhere, plus the bias), bias None. Built once per forward, it
    spares every layer SDPA's own conversion of a bool mask (a pass over the mask and a fresh
    tensor each call; SDPA also ran a quarter faster on it, bf16 on AVX-512 BF16). PB-Relax
    (`pb_relaxed`) and an already additive mask keep what they have."""
    if mask.dtype != torch.bool or pb_relaxed(dtype, pb_relax_alpha, mask.device):
        return mask, bias
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return (additive if bias is None else additive + bias.to(dtype)), None


def pb_relax_attention(q, k, v, mask, bias, alpha: float, dropout: float = 0.0):
    """softmax(QK^T/sqrt(d)) computed as softmax((QK^T/(alpha sqrt(d)) - max) * alpha): the
    scores never exceed fp16 range (CogView, "PB-Relax")."""
    scores = torch.matmul(q / (alpha * math.sqrt(q.shape[-1])), k.transpose(-1, -2))
    scores = (scores - scores.amax(dim=-1, keepdim=True).detach()) * alpha
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(torch.softmax(scores.float(), dim=-1).to(v.dtype), dropout)
    return torch.matmul(probs, v)


def window_gather_index(
    cfg: ModelConfig, frames: Sequence[int], shift: int
) -> tuple[torch.Tensor, TokenMeta]:
    """Index [windows, len(frames) * w * w] into the flattened tokens of whole `frames` laid out
    in this order (e.g. 0..F-1, or the given frames 0, 2, 4 of a stage-2 chunk), gathering each
    shifted 3D window (all those frames x w x w positions), and the TokenMeta of the gathered
    order. The roll by `shift` puts the wrapped strips into the last window; `visible()`
    (region mask) keeps them apart."""
    side, w, n = cfg.frame_tokens, cfg.window_size, cfg.tokens_per_frame
    grid = torch.arange(n).reshape(side, side).roll(shifts=(-shift, -shift), dims=(0, 1))
    windows = grid.reshape(side // w, w, side // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    slots = torch.arange(len(frames))
    index = (slots[None, :, None] * n + windows[:, None, :]).reshape(windows.shape[0], -1)
    frame_ids = torch.as_tensor(list(frames), dtype=torch.long)
    meta = TokenMeta(frame=frame_ids[index // n].flatten(), pos=(index % n).flatten())
    return index, meta

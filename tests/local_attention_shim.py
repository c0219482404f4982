"""A plain-PyTorch stand-in for the CUDA extension `localAttention` (Sleepychord/
Image-Local-Attention, which SwissArmyTransformer's `ops.local_attention_function` imports and
the release's DsrModel calls as `f_similar` / `f_weighting`), forward only, non-causal.

What the kernels compute (src/kernels.cuh `cc2k` and `ck2c_ori`, src/similar.cu, weighting.cu):
queries x_ori [B, C, H, W] at a resolution `a = H / h` times that of the keys x_loc [B', C, h, w]
(B a multiple of B': "auto expand"); the query at (i, j) scores the keys at
(i // a - kH // 2 + k // kW, j // a - kW // 2 + k % kW), k < kH * kW, as a dot product over C;
out-of-grid slots score -10000. `similar_forward` -> [B, H, W, kH * kW]; `weighting_forward`
(values [B', C, h, w], weights [B, H, W, kH * kW]) -> [B, C, H, W], the weighted sum over the
in-grid slots. tests/test_parity_dsr.py checks this file against a literal transcription of
the kernels' index arithmetic before the release's DsrModel runs on it.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

OUT_OF_GRID = -10000.0


def _windows(
    x_loc: torch.Tensor, kH: int, kW: int, scale: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_loc [B', C, h, w] -> every query's key window [B', C, h*a, w*a, kH*kW] and the in-grid
    mask [h*a, w*a, kH*kW] (queries of one key cell share its window)."""
    _, C, h, w = x_loc.shape
    ah, aw = scale
    rH, rW = kH // 2, kW // 2
    padded = F.pad(x_loc, (rW, kW - 1 - rW, rH, kH - 1 - rH))
    cells = padded.unfold(2, kH, 1).unfold(3, kW, 1)  # [B', C, h, w, kH, kW]
    cells = cells.reshape(*cells.shape[:4], kH * kW)
    inside = F.pad(torch.ones(h, w, dtype=torch.bool), (rW, kW - 1 - rW, rH, kH - 1 - rH))
    inside = inside.unfold(0, kH, 1).unfold(1, kW, 1).reshape(h, w, kH * kW)
    expand = cells.repeat_interleave(ah, dim=2).repeat_interleave(aw, dim=3)
    return expand, inside.repeat_interleave(ah, dim=0).repeat_interleave(aw, dim=1)


def _scale(big: torch.Tensor, small: torch.Tensor) -> tuple[int, int]:
    return big.shape[-2] // small.shape[-2], big.shape[-1] // small.shape[-1]


def _expand_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.repeat_interleave(batch // x.shape[0], dim=0)


def similar_forward(x_ori, x_loc, kH, kW, casual_mask=False):
    if casual_mask:
        raise NotImplementedError("the release's DSR calls the kernels non-causal only")
    keys, inside = _windows(x_loc, kH, kW, _scale(x_ori, x_loc))
    keys = _expand_batch(keys, x_ori.shape[0])
    scores = torch.einsum("bchw,bchwk->bhwk", x_ori, keys)
    return scores.masked_fill(~inside, OUT_OF_GRID).contiguous()  # the kernels return fresh tensors


def weighting_forward(x_ori, x_weight, kH, kW, casual_mask=False):
    if casual_mask:
        raise NotImplementedError("the release's DSR calls the kernels non-causal only")
    big = torch.empty(x_weight.shape[1:3])
    values, inside = _windows(x_ori, kH, kW, _scale(big, x_ori))
    values = _expand_batch(values, x_weight.shape[0])
    return torch.einsum("bhwk,bchwk->bchw", x_weight * inside, values).contiguous()


def _no_backward(*args, **kwargs):
    raise NotImplementedError("the stand-in runs the release's forward only")


def install() -> None:
    """Register as the `localAttention` module SwissArmyTransformer imports."""
    module = types.ModuleType("localAttention")
    module.similar_forward, module.weighting_forward = similar_forward, weighting_forward
    module.similar_backward = module.weighting_backward_ori = module.weighting_backward_weight = _no_backward
    sys.modules["localAttention"] = module

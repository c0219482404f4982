"""DSR's high-res attention in plain PyTorch, with memory that grows with the window.

A high-res query at (r, c) of an R x R grid (scale s over the low-res r' x r' grid) scores, in one
softmax, the low-res cells of a `low_window` square centred on (r // s, c // s) (the base
attention's keys and values of the low-res tokens) and the high-res cells of a `high_window_rows`
x `high_window_cols` box centred on (r, c) (its own keys and values); cells outside a grid are
excluded. This is what the release's CUDA kernels (Sleepychord/Image-Local-Attention
`f_similar` / `f_weighting`, non-causal) compute, there with out-of-grid scores of -10000.

The window is walked one offset at a time over zero-padded key grids: each offset is a shifted
view (no copy) whose product with the queries is reduced at once, so beyond the inputs only the
scores ([..., window]) and one query-sized temporary live; nothing grows with R^2 x R^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cogvideo import parallel
from cogvideo.models.dsr.config import DsrConfig
from cogvideo.models.dsr.layout import window_offsets


class Windows:
    """The geometry shared by every layer: offsets, paddings and which offsets fall inside the
    grids for each query (built once per forward, on the queries' device)."""

    def __init__(self, cfg: DsrConfig, device: torch.device):
        self.side, self.low_side, self.scale = cfg.high_frame_tokens, cfg.frame_tokens, cfg.scale
        self.low, self.high = window_offsets(cfg)
        self.low_pad = cfg.low_window // 2
        self.high_pad = (cfg.high_window_rows // 2, cfg.high_window_cols // 2)
        r = torch.arange(self.side, device=device)
        cell = r // self.scale
        inside_low = [_inside(cell, a, b, self.low_side) for a, b in self.low]
        inside_high = [_inside(r, a, b, self.side) for a, b in self.high]
        self.inside = torch.stack(inside_low + inside_high, dim=-1)  # [R, R, window]


def _inside(index: torch.Tensor, da: int, db: int, size: int) -> torch.Tensor:
    rows = ((index + da) >= 0) & ((index + da) < size)
    cols = ((index + db) >= 0) & ((index + db) < size)
    return rows[:, None] & cols[None, :]


def _low_grid(x: torch.Tensor, win: Windows) -> torch.Tensor:
    """[B, H, n, d] -> zero-padded [B, H, r'+2p, 1, r'+2p, 1, d] (broadcast over the s x s block)."""
    B, H, _, d = x.shape
    p = win.low_pad
    grid = F.pad(x.view(B, H, win.low_side, win.low_side, d), (0, 0, p, p, p, p))
    return grid[:, :, :, None, :, None, :]


def _high_grid(x: torch.Tensor, win: Windows) -> torch.Tensor:
    B, H, _, d = x.shape
    ph, pw = win.high_pad
    return F.pad(x.view(B, H, win.side, win.side, d), (0, 0, pw, pw, ph, ph))


def _low_cells(grid: torch.Tensor, win: Windows, a: int, b: int) -> torch.Tensor:
    p, n = win.low_pad, win.low_side
    return grid[:, :, p + a : p + a + n, :, p + b : p + b + n]


def _high_cells(grid: torch.Tensor, win: Windows, a: int, b: int) -> torch.Tensor:
    (ph, pw), R = win.high_pad, win.side
    return grid[:, :, ph + a : ph + a + R, pw + b : pw + b + R]


def local_attention(q, k_high, v_high, k_low, v_low, win: Windows, dropout: float = 0.0) -> torch.Tensor:
    """q, k_high, v_high [B, H, R*R, d] (high-res rows), k_low, v_low [B, H, r'*r', d] (the base
    attention's low-res keys and values) -> context [B, H, R*R, d]. `dropout` acts on the
    probabilities (training), drawn from this TP rank's model-parallel RNG state."""
    B, H, N, d = q.shape
    R, r, s = win.side, win.low_side, win.scale
    q = q / math.sqrt(d)
    q_high = q.view(B, H, R, R, d)
    q_low = q.view(B, H, r, s, r, s, d)  # queries grouped by low-res cell
    kl, kh = _low_grid(k_low, win), _high_grid(k_high, win)
    scores = [(q_low * _low_cells(kl, win, a, b)).sum(-1).view(B, H, R, R) for a, b in win.low]
    scores += [(q_high * _high_cells(kh, win, a, b)).sum(-1) for a, b in win.high]
    scores = torch.stack(scores, dim=-1).masked_fill(~win.inside, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    if dropout:
        with parallel.model_parallel_rng(q.device):
            probs = F.dropout(probs, dropout)
    vl, vh = _low_grid(v_low, win), _high_grid(v_high, win)
    out = torch.zeros_like(q_low)  # accumulated in place, one fused multiply-add per window cell
    for i, (a, b) in enumerate(win.low):
        out.addcmul_(probs[..., i].view(B, H, r, s, r, s, 1), _low_cells(vl, win, a, b))
    out = out.view(B, H, R, R, d)
    first = len(win.low)
    for i, (a, b) in enumerate(win.high):
        out.addcmul_(probs[..., first + i, None], _high_cells(vh, win, a, b))
    return out.view(B, H, N, d)

"""DSR's sequence: position ids, the attention rules of the rows before the high-res block,
the high-res windows, and the training example (the family's batch builder).

As released (THUDM/CogVideo `sr_pipeline/dsr_sampling.py` `filling_sequence_dsr`, `dsr_model.py`):

- position ids: left pads 0, the n real text tokens 0..n-1, low-res code i
  `low_position_offset + i`; high-res slot j reads row j of the extra (high-res) table;
- rows before the high-res block, one softmax over those rows: a pad sees the whole text block
  (pads and text), a text token the real text, a low-res token the real text and every low-res
  token (nothing causal); none of them sees a high-res slot;
- a high-res query at (r, c) sees, in one softmax, the `low_window` x `low_window` low-res cells
  centred on its cell (r // s, c // s) and the `high_window_rows` x `high_window_cols` high-res
  cells centred on itself; cells outside a grid are excluded; it never sees the text.
"""

from __future__ import annotations

import numpy as np
import torch

from cogvideo.models.dsr.config import DsrConfig


def text_pads(cfg: DsrConfig, tokens: torch.Tensor) -> torch.Tensor:
    """[B, text_length] True at the left pads (the release's pad id is never a text id)."""
    return tokens[:, : cfg.text_length] == cfg.text_pad_id


def position_ids(cfg: DsrConfig, pads: torch.Tensor) -> torch.Tensor:
    """Backbone-table rows [B, text_length + n] of the rows before the high-res block."""
    text = ((~pads).long().cumsum(dim=1) - 1).clamp(min=0)
    low = cfg.low_position_offset + torch.arange(cfg.tokens_per_frame, device=pads.device)
    return torch.cat([text, low.expand(len(pads), -1)], dim=1)


def context_mask(cfg: DsrConfig, pads: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T+n, T+n] (True = attend) of the rows before the high-res block."""
    T, L = cfg.text_length, cfg.high_start
    B, device = len(pads), pads.device
    key_is_text = torch.zeros(B, L, dtype=torch.bool, device=device)
    key_is_text[:, :T] = ~pads
    is_low = torch.arange(L, device=device) >= T
    query_pad = torch.zeros(B, L, dtype=torch.bool, device=device)
    query_pad[:, :T] = pads
    text_rows = key_is_text[:, None, :].expand(B, L, L).clone()  # text and low-res rows: real text
    text_rows[:, T:, :] |= is_low[None, None, :]  # low-res rows: all low-res too
    pad_rows = (~is_low)[None, None, :].expand(B, L, L)  # pad rows: the whole text block
    return torch.where(query_pad[:, :, None], pad_rows, text_rows)[:, None]


def window_offsets(cfg: DsrConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(low-res cell offsets, high-res cell offsets) of a query's window, in score order."""
    lw, rows, cols = cfg.low_window, cfg.high_window_rows, cfg.high_window_cols
    low = [(a - lw // 2, b - lw // 2) for a in range(lw) for b in range(lw)]
    high = [(a - rows // 2, b - cols // 2) for a in range(rows) for b in range(cols)]
    return low, high


def high_res_keys(cfg: DsrConfig) -> torch.Tensor:
    """Bool [N, n + N]: which low-res and high-res keys each high-res query sees (the dense
    form of the windows, for the reference path and tests)."""
    side, low_side, s = cfg.high_frame_tokens, cfg.frame_tokens, cfg.scale
    r = torch.arange(side).repeat_interleave(side)
    c = torch.arange(side).repeat(side)
    low_r, low_c = torch.arange(low_side).repeat_interleave(low_side), torch.arange(low_side).repeat(low_side)
    lh, hh = cfg.low_window // 2, cfg.high_window_rows // 2
    lwid, hw = cfg.low_window // 2, cfg.high_window_cols // 2
    sees_low = ((low_r[None] - (r // s)[:, None]).abs() <= lh) & (
        (low_c[None] - (c // s)[:, None]).abs() <= lwid
    )
    sees_high = ((r[None] - r[:, None]).abs() <= hh) & ((c[None] - c[:, None]).abs() <= hw)
    return torch.cat([sees_low, sees_high], dim=1)


def build_example(cfg: DsrConfig, text_ids, low, high) -> tuple[torch.Tensor, torch.Tensor]:
    """One training pair -> (tokens [L], targets [N]): left-padded text, the low-res codes,
    the high-res slots (`high_slot_tokens`); the targets are the high-res codes."""
    text_ids = torch.as_tensor(np.asarray(text_ids), dtype=torch.long).flatten()
    low = torch.as_tensor(np.asarray(low), dtype=torch.long)
    high = torch.as_tensor(np.asarray(high), dtype=torch.long)
    vocab = cfg.vocab
    if text_ids.numel() > cfg.text_length:
        raise ValueError(
            f"text has {text_ids.numel()} tokens; the layout allows text_length={cfg.text_length}"
        )
    if text_ids.numel() and not all(vocab.is_text(int(t)) for t in text_ids):
        raise ValueError(f"text ids must be text pieces of the vocabulary; got {text_ids.tolist()}")
    for name, codes, side in (("low", low, cfg.frame_tokens), ("high", high, cfg.high_frame_tokens)):
        if codes.numel() != side * side:
            raise ValueError(
                f"{name}-res codes: expected a {side} x {side} grid, got shape {list(codes.shape)}"
            )
        if codes.numel() and not ((codes >= 0) & (codes < vocab.num_image_tokens)).all():
            raise ValueError(f"{name}-res codes must be image ids in [0, {vocab.num_image_tokens})")
    pads = torch.full((cfg.text_length - text_ids.numel(),), cfg.text_pad_id, dtype=torch.long)
    return torch.cat([pads, text_ids, low.flatten(), high_slot_tokens(cfg, low)]), high.flatten()


def high_slot_tokens(cfg: DsrConfig, low: torch.Tensor) -> torch.Tensor:
    """[N] what the high-res slots hold (`cfg.high_slots`): `<start_of_image>` (the release), or
    at slot (r, c) the low-res code of cell (r // scale, c // scale)."""
    if cfg.high_slots == "boi":
        return torch.full((cfg.high_tokens,), cfg.vocab.boi_id, dtype=torch.long)
    grid = low.reshape(cfg.frame_tokens, cfg.frame_tokens)
    return grid.repeat_interleave(cfg.scale, 0).repeat_interleave(cfg.scale, 1).flatten()

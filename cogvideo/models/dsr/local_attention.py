"""DSR's high-res attention in plain PyTorch, with memory that grows with the window.

A high-res query at (r, c) of an R x R grid (scale s over the low-res r' x r' grid) scores, in one
softmax, the low-res cells of a `low_window` square centred on (r // s, c // s) (the base
attention's keys and values of the low-res tokens) and the high-res cells of a `high_window_rows`
x `high_window_cols` box centred on (r, c) (its own keys and values); cells outside a grid are
excluded. This is what the release's CUDA kernels (Sleepychord/Image-Local-Attention
`f_similar` / `f_weighting`, non-causal) compute, there with out-of-grid scores of -10000.

Blocked: the queries are grouped in tiles of `a` x `a` low-res cells (a*s x a*s high-res
queries); each tile gathers once (one index_select) the keys any of its queries sees (the low-res
cells around its cells, the high-res box around it; out-of-grid cells read a clamped cell and are
masked) and scores them with one batched matmul, a fixed mask (the windows relative to the tile,
and the keys inside the grids) keeping each query's own window. Tiles are scored `chunk_rows`
tile rows at a time, so what lives beyond the inputs and the output is one chunk's gathered keys,
values, scores and probabilities (per query a few times the window) and the keys and values of
both grids side by side: nothing grows with R^2 x R^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cogvideo import parallel
from cogvideo.models.dsr.config import DsrConfig
from cogvideo.models.dsr.layout import window_offsets

TILE_CELLS = 2  # low-res cells per tile side: 20 -> 60 runs fastest and smallest at 2 (bench_dsr.py)
CHUNK_ROWS = 1  # tile rows scored at a time: 20 -> 60 in ten chunks (bench_dsr.py: as fast as one chunk)


class Tiling:
    """How the high-res queries are tiled: `cells` x `cells` low-res cells per tile (TILE_CELLS
    where it divides the low-res side, else 1), `per_side` tiles per side, each gathering the
    `low_box`^2 low-res cells and the `high_box` of high-res cells its queries see; `chunk_rows`
    tile rows scored at a time."""

    def __init__(self, cfg: DsrConfig, tile_cells: int = TILE_CELLS, chunk_rows: int = CHUNK_ROWS):
        self.low_side, self.side, self.scale = cfg.frame_tokens, cfg.high_frame_tokens, cfg.scale
        self.cells = tile_cells if self.low_side % tile_cells == 0 else 1
        self.per_side = self.low_side // self.cells
        self.chunk_rows = min(chunk_rows, self.per_side)
        self.query_side = self.cells * self.scale  # high-res queries per tile side
        self.low_pad = cfg.low_window // 2
        self.high_pad = (cfg.high_window_rows // 2, cfg.high_window_cols // 2)
        self.low_box = self.cells + 2 * self.low_pad
        self.high_box = (self.query_side + 2 * self.high_pad[0], self.query_side + 2 * self.high_pad[1])

    @property
    def tiles(self) -> int:
        return self.per_side**2

    @property
    def tile_queries(self) -> int:
        return self.query_side**2

    @property
    def tile_keys(self) -> int:
        return self.low_box**2 + self.high_box[0] * self.high_box[1]

    @property
    def chunk_tiles(self) -> int:
        """Tiles in the largest chunk."""
        return self.chunk_rows * self.per_side


class Windows(Tiling):
    """The tiling shared by every layer (built once per forward, on the queries' device, from
    layout.window_offsets): `index` [tiles, tile_keys], each gathered key's row in the low-res
    then high-res keys (clamped into the grids), and `hidden` [tiles, tile_queries, tile_keys],
    True where that key is outside the query's windows or outside its grid."""

    def __init__(
        self, cfg: DsrConfig, device: torch.device, tile_cells: int = TILE_CELLS, chunk_rows: int = CHUNK_ROWS
    ):
        super().__init__(cfg, tile_cells, chunk_rows)
        low, high = window_offsets(cfg)
        low_sees, low_index = self._low_keys(low, device)
        high_sees, high_index = self._high_keys(high, device)
        self.hidden = ~torch.cat([low_sees, high_sees], dim=-1)
        self.index = torch.cat([low_index, self.low_side**2 + high_index], dim=-1)

    def _queries(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tile index [T, 1, 1], query row and column inside the tile [1, Q, 1]."""
        u = torch.arange(self.query_side, device=device)
        tile = torch.arange(self.tiles, device=device)[:, None, None]
        return (
            tile,
            u.repeat_interleave(self.query_side)[None, :, None],
            u.repeat(self.query_side)[None, :, None],
        )

    def _low_keys(self, offsets, device) -> tuple[torch.Tensor, torch.Tensor]:
        tile, u, v = self._queries(device)
        y = torch.arange(self.low_box, device=device).repeat_interleave(self.low_box)[None, None]
        x = torch.arange(self.low_box, device=device).repeat(self.low_box)[None, None]
        dy, dx = y - self.low_pad - u // self.scale, x - self.low_pad - v // self.scale
        rows = (tile // self.per_side) * self.cells + y - self.low_pad  # the key's low-res cell
        cols = (tile % self.per_side) * self.cells + x - self.low_pad
        sees = _in_window(dy, dx, offsets) & _inside(rows, cols, self.low_side)
        return sees, _cell_index(rows, cols, self.low_side)

    def _high_keys(self, offsets, device) -> tuple[torch.Tensor, torch.Tensor]:
        tile, u, v = self._queries(device)
        (box_h, box_w), (ph, pw) = self.high_box, self.high_pad
        y = torch.arange(box_h, device=device).repeat_interleave(box_w)[None, None]
        x = torch.arange(box_w, device=device).repeat(box_h)[None, None]
        rows = (tile // self.per_side) * self.query_side + y - ph
        cols = (tile % self.per_side) * self.query_side + x - pw
        sees = _in_window(y - ph - u, x - pw - v, offsets) & _inside(rows, cols, self.side)
        return sees, _cell_index(rows, cols, self.side)


def _in_window(dy: torch.Tensor, dx: torch.Tensor, offsets) -> torch.Tensor:
    sees = torch.zeros(torch.broadcast_shapes(dy.shape, dx.shape), dtype=torch.bool, device=dy.device)
    for a, b in offsets:
        sees |= (dy == a) & (dx == b)
    return sees


def _inside(rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    return (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)


def _cell_index(rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    """[T, 1, K] cells -> [T, K] flat indices, out-of-grid cells clamped onto the grid (masked)."""
    return (rows.clamp(0, size - 1) * size + cols.clamp(0, size - 1))[:, 0]


def local_attention(q, k_high, v_high, k_low, v_low, win: Windows, dropout: float = 0.0) -> torch.Tensor:
    """q, k_high, v_high [B, H, R*R, d]; k_low, v_low [B, H, r'*r', d] (the backbone
    attention's low-res keys and values) -> context [B, H, R*R, d]. `dropout` acts on the
    probabilities (training), drawn from this TP rank's model-parallel RNG state."""
    B, H, N, d = q.shape
    t, n = win.per_side, win.query_side
    keys, values = torch.cat([k_low, k_high], dim=2), torch.cat([v_low, v_high], dim=2)
    queries = q.view(B, H, t, n, t, n, d)
    out = q.new_empty(B, H, t, n, t, n, d)  # filled a chunk of tile rows at a time
    for first in range(0, t, win.chunk_rows):
        rows = slice(first, min(first + win.chunk_rows, t))
        out[:, :, rows] = _attend_tile_rows(queries[:, :, rows], keys, values, win, rows, dropout)
    return out.view(B, H, N, d)


def _attend_tile_rows(queries, keys, values, win: Windows, rows: slice, dropout: float) -> torch.Tensor:
    """The queries of tile rows `rows` [B, H, rows, n, t, n, d] -> their context, same shape
    (its temporaries freed on return, before the next chunk's are made)."""
    B, H, _, n, t, _, d = queries.shape
    tiles = slice(rows.start * t, rows.stop * t)
    index = win.index[tiles].flatten()
    tile_keys = keys.index_select(2, index).view(B, H, -1, win.tile_keys, d)
    tile_values = values.index_select(2, index).view(B, H, -1, win.tile_keys, d)
    tiled = queries.transpose(3, 4).reshape(B, H, -1, n * n, d) / math.sqrt(d)
    scores = (tiled @ tile_keys.transpose(-1, -2)).masked_fill_(win.hidden[tiles], float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(queries.dtype, torch.float32)).to(queries.dtype)
    if dropout:
        with parallel.model_parallel_rng(queries.device):
            probs = F.dropout(probs, dropout)
    return (probs @ tile_values).view(B, H, -1, t, n, n, d).transpose(3, 4)

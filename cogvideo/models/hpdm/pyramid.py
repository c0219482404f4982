"""The patch pyramid's geometry: nested random crops for training, the patches they cut out of a
video, the coordinates the model sees, the grid that samples a coarser level's activations at a
finer patch's place, and the overlapped tiles (with their blending windows) of sampling.

Positions are in the whole video's normalised coordinates: along each axis (T, H, W) a patch is
a box (start, extent) in [0, 1]; an interface token's place is its centre. A patch of level l with
pixel offset o (in level-l pixels) of a level of n pixels starts at o / n and extends patch / n.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from cogvideo.models.hpdm.config import HPDMConfig


def sample_offsets(cfg: HPDMConfig, generator: torch.Generator) -> torch.Tensor:
    """One nested crop per level, [levels, 3] pixel offsets (T, H, W) in each level's own pixels:
    level 1 is the whole level-1 video; each finer patch lies inside its coarser one, on the
    interface-token grid (so its tokens sit on the coarser tokens' upsampled grid)."""
    offsets = torch.zeros(cfg.num_levels, 3, dtype=torch.long)
    for level in range(2, cfg.num_levels + 1):
        step = [f // c for f, c in zip(cfg.level_scale(level), cfg.level_scale(level - 1))]
        for axis in range(3):
            kernel, room = cfg.tokenizer_patch[axis], (step[axis] - 1) * cfg.patch[axis]
            choice = int(torch.randint(room // kernel + 1, (), generator=generator))
            offsets[level - 1, axis] = offsets[level - 2, axis] * step[axis] + choice * kernel
    return offsets


def extract_patches(cfg: HPDMConfig, video: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """video [3, T, H, W] at the finest level's size -> [levels, 3, *patch]: each level's crop,
    box-filtered down to that level's resolution (area averaging, exact for integer factors)."""
    patches = []
    finest = cfg.level_scale(cfg.num_levels)
    for level in range(1, cfg.num_levels + 1):
        factor = [f // s for f, s in zip(finest, cfg.level_scale(level))]
        start = [int(o) * f for o, f in zip(offsets[level - 1], factor)]
        size = [p * f for p, f in zip(cfg.patch, factor)]
        crop = video[
            :, start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]
        ]
        patches.append(F.avg_pool3d(crop.unsqueeze(0), kernel_size=factor).squeeze(0))
    return torch.stack(patches)


def boxes(
    cfg: HPDMConfig, level: int, offsets: torch.Tensor, level_size
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (start, extent) [..., 3] of level-`level` patches at pixel `offsets` [..., 3]."""
    size = torch.tensor(level_size, dtype=torch.float64)
    start = offsets.to(torch.float64) / size
    extent = (torch.tensor(cfg.patch, dtype=torch.float64) / size).expand_as(start)
    return start, extent


def token_centres(cfg: HPDMConfig, start: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """[B, 3] boxes -> [B, t, h, w, 3] normalised centres of the patch's interface tokens."""
    axes = []
    for axis, count in enumerate(cfg.token_grid):
        fraction = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        axes.append(start[:, axis, None] + fraction[None] * extent[:, axis, None])
    t, h, w = cfg.token_grid
    return torch.stack(
        [
            axes[0][:, :, None, None].expand(-1, t, h, w),
            axes[1][:, None, :, None].expand(-1, t, h, w),
            axes[2][:, None, None, :].expand(-1, t, h, w),
        ],
        dim=-1,
    )


def token_coordinates(cfg: HPDMConfig, start: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """The model's raw coordinate input, [B, tokens, 4]: each token's centre (t, y, x) and the
    patch's height extent (the level's scale)."""
    centres = token_centres(cfg, start, extent).flatten(1, 3)
    scale = extent[:, None, 1:2].expand(-1, centres.shape[1], 1)
    return torch.cat([centres, scale], dim=-1)


def context_grid(cfg: HPDMConfig, fine: tuple, coarse: tuple) -> torch.Tensor:
    """grid_sample's grid [B, t, h, w, 3] (x, y, t order, align_corners=False convention) placing
    the fine patch's token centres in the coarse box's activation grid: -1 and 1 are its edges."""
    centres = token_centres(cfg, *fine)
    start, extent = coarse
    relative = (centres - start[:, None, None, None, :]) / extent[:, None, None, None, :]
    return (2 * relative - 1).flip(-1)


def sample_context(activations: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Coarser activations [B, D, t, h, w] at the grid's places -> [B, tokens, D] (trilinear,
    clamped at the borders as an upsampling would be)."""
    sampled = F.grid_sample(
        activations, grid.to(activations.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled.flatten(2).transpose(1, 2)


def tile_offsets(cfg: HPDMConfig, level_size, overlap: tuple[float, float]) -> list[tuple[int, int, int]]:
    """The pixel offsets of the overlapped tiles covering a level: along time with the first
    overlap, along height and width with the second (0.5: each tile shares half its side with the
    next). Strides are whole interface tokens; a size the tiles cannot cover exactly is refused."""
    starts = []
    for axis, (size, patch, kernel) in enumerate(zip(level_size, cfg.patch, cfg.tokenizer_patch)):
        share = overlap[0] if axis == 0 else overlap[1]
        stride = max(kernel, round(patch * (1 - share) / kernel) * kernel)
        if size < patch or (size - patch) % stride:
            raise ValueError(
                f"a level of {tuple(level_size)} pixels is not tiled by {tuple(cfg.patch)} patches at stride "
                f"{stride} along axis {axis}: sizes are patch + k * stride"
            )
        starts.append(range(0, size - patch + 1, stride))
    return list(itertools.product(*starts))


def window(length: int, device=None) -> torch.Tensor:
    """Blending weights along one side of a tile: a tent, highest in the middle, never zero."""
    i = torch.arange(length, device=device, dtype=torch.float64)
    return torch.minimum(i + 1, length - i)


def tile_weights(sizes, device=None) -> torch.Tensor:
    """The separable blending window of a tile of `sizes` (T, H, W)."""
    t, h, w = (window(n, device) for n in sizes)
    return t[:, None, None] * h[None, :, None] * w[None, None, :]


def seam_contrast(cfg: HPDMConfig, video: torch.Tensor, overlap: tuple[float, float]) -> tuple[float, float]:
    """How visible the tiles are in a finished finest level, video [3 or C, T, H, W]: the mean
    absolute difference between neighbouring pixels across the tiles' edges (every row and column
    where a tile starts or ends) and inside the tiles (every other neighbouring pair), over height
    and width. Seamless: across <= inside."""
    size = tuple(video.shape[1:])
    tiles = tile_offsets(cfg, size, overlap)
    across, inside = [], []
    for axis in (1, 2):  # height, width
        edges = {o[axis] for o in tiles} | {o[axis] + cfg.patch[axis] for o in tiles}
        edges -= {0, size[axis]}
        steps = (
            video.double().diff(dim=axis + 1).abs().mean(dim=[d for d in range(video.dim()) if d != axis + 1])
        )
        # steps[i] is the difference between pixel i and i + 1: across an edge at e when i = e - 1
        is_edge = torch.zeros(size[axis] - 1, dtype=torch.bool)
        is_edge[[e - 1 for e in sorted(edges)]] = True
        across.append(steps[is_edge])
        inside.append(steps[~is_edge])
    return float(torch.cat(across).mean()), float(torch.cat(inside).mean())

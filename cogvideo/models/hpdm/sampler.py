"""Sampling HPDM: level by level, coarse to fine, each level's video denoised tile by tile.

Level l is a whole video at its own size (the trained pyramid, or any output size its tiles
cover). Its denoiser D(x; sigma) runs the model on overlapped tiles of the patch size and blends
their estimates with a tent window. Level 1 takes `steps` steps of EDM's stochastic second-order
sampler (deterministic with `stochastic=False`); level l takes steps / 2^(l-1) deterministic
Euler steps (the supplement: second-order steps gave grainy later levels). A finer level's
context is the finished coarser levels' activations, computed once per level on the finished
video at sigma_min and kept for the whole level ("the activation cache"); without the cache every
tile of every step recomputes the coarser tiles it reads, which gives the same video, slower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cogvideo.diffusion import edm
from cogvideo.diffusion.guidance import guided_prediction
from cogvideo.models.hpdm import pyramid
from cogvideo.models.hpdm.config import HPDMConfig
from cogvideo.models.hpdm.model import Source


@dataclass(frozen=True)
class PyramidOptions:
    steps: int = 128  # at level 1; halved at every finer level
    overlap: float = 0.5  # share of a tile's side along height and width shared with the next (0.5: metrics)
    temporal_overlap: float = 0.5  # the same along time
    guidance_scale: float = 1.0
    stochastic: bool = True  # level 1 with EDM's churn (the supplement: not for text-to-video)
    churn: edm.Churn = field(default_factory=edm.Churn)
    cache: bool = True  # keep the coarser levels' activations (False: recompute them per tile)
    tiles_per_batch: int = 8
    # the coarser levels' activations on this many token grids: their own, and their finished video
    # rolled by g/n of a token along height and width (g = 1 .. n-1); a finer token reads the mean of
    # the contexts (1: the paper's one grid). A token-resolution context changes most at the coarser
    # token borders, which at 50 % overlap are the finer tiles' (README: the demo's seams)
    context_grids: int = 1


def level_steps(steps: int, level: int) -> int:
    return max(1, steps >> (level - 1))


class PyramidSampler:
    """`sample(cond, uncond, generator, output)` -> videos [B, 3, T, H, W] in [-1, 1]. `output` is
    the finest level's size (default: the trained pyramid's); every level's size must be tiled
    exactly by the patch at the options' overlaps."""

    def __init__(self, model, cfg: HPDMConfig, options: PyramidOptions, on_step: Callable | None = None):
        self.model, self.cfg, self.options = model, cfg, options
        self.precond = edm.Preconditioner(cfg.edm)
        self.on_step = on_step  # (level, step, steps)
        param = next(model.parameters())
        self.device, self.param_dtype = param.device, param.dtype
        self.dtype = torch.float64 if param.dtype == torch.float64 else torch.float32  # the sampler's state

    # ---- the whole pyramid -----------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond, uncond, generator: torch.Generator, output=None) -> torch.Tensor:
        cfg, scale = self.cfg, self.options.guidance_scale
        cond, uncond = cond.to(self.device), uncond.to(self.device)
        batch_cond = cond if scale == 1.0 else torch.cat([cond, uncond])
        finished: list[torch.Tensor] = []  # per level, batched as the denoiser sees it (guided: twice)
        caches: list[Source] = []
        for level in range(1, cfg.num_levels + 1):
            size = cfg.level_size(level, output)
            noise = torch.randn((cond.shape[0], 3, *size), generator=generator, dtype=torch.float64)
            x = (noise * cfg.edm.sigma_max).to(self.device, self.dtype)

            def denoise(xs, sigma, level=level):
                def predict(batch_x, batch_cond):
                    repeats = batch_x.shape[0] // sigma.shape[0]
                    return self.denoise(level, batch_x, sigma.repeat(repeats), batch_cond, finished, caches)

                return guided_prediction(predict, xs, cond, uncond, scale)

            video = self._run_level(level, denoise, x, generator)
            finished.append(video if scale == 1.0 else torch.cat([video, video]))
            if self.options.cache and level < cfg.num_levels:
                caches.extend(self.contexts(level, finished, batch_cond, caches))
        return finished[-1][: cond.shape[0]]

    def _run_level(self, level, denoise, x, generator):
        steps = level_steps(self.options.steps, level)
        progress = None if self.on_step is None else (lambda i, n: self.on_step(level, i, n))
        if level == 1:
            churn = self.options.churn if self.options.stochastic else None
            sigmas = edm.karras_sigmas(self.cfg.edm, steps)
            return edm.sample_heun(denoise, x, sigmas, churn, generator, progress)
        return edm.sample_euler(denoise, x, self.cfg.edm, steps, progress)

    # ---- one level's denoiser ---------------------------------------------------------------
    def denoise(self, level, x, sigma, cond, finished, caches) -> torch.Tensor:
        """D(x; sigma) of level `level`'s whole video x [B, 3, T, H, W], blended from its tiles."""
        patch, size = self.cfg.patch, tuple(x.shape[2:])
        total = torch.zeros_like(x, dtype=torch.float64)
        weight = torch.zeros(size, dtype=torch.float64, device=x.device)
        window = pyramid.tile_weights(patch, x.device)
        for group, sources in self._groups(level, self._tiles(size), size, cond, finished, caches):
            denoised, _ = self._run_tiles(level, x, group, sigma, cond, sources)
            for offset, tile in zip(group, denoised.chunk(len(group))):
                _add(total, tile.double() * window, offset, patch)
                _add(weight, window, offset, patch)
        return (total / weight).to(x.dtype)

    def _tiles(self, size) -> list[tuple[int, int, int]]:
        return pyramid.tile_offsets(self.cfg, size, (self.options.temporal_overlap, self.options.overlap))

    def _groups(self, level, tiles, size, cond, finished, caches):
        """Tiles in batches with the coarser sources they read: cached (whole levels, shared by a
        batch of tiles) or recomputed for each tile on its own."""
        if level == 1 or self.options.cache:
            for i in range(0, len(tiles), self.options.tiles_per_batch):
                group = tiles[i : i + self.options.tiles_per_batch]
                grids = (level - 1) * self.options.context_grids  # the coarser levels' sources, in order
                yield group, [_repeat_source(c, len(group)) for c in (caches or [])[:grids]]
        else:
            for offset in tiles:
                yield [offset], self._recompute(level, offset, size, cond, finished)

    def _run_tiles(self, level, video, group, sigma, cond, sources):
        """The model on a batch of tiles (tile-major: tile 0's B samples, tile 1's, ...) -> their
        denoised estimates D and their activations entering each block."""
        crops = torch.cat([_crop(video, offset, self.cfg.patch) for offset in group])
        sigmas = sigma.to(video.device, torch.float64).repeat(len(group)).view(-1, 1, 1, 1, 1)
        start, extent = pyramid.boxes(
            self.cfg, level, torch.tensor(group).repeat_interleave(video.shape[0], 0), video.shape[2:]
        )
        network_in = self.precond.c_in(crops.double(), sigmas).to(self.param_dtype)
        c_noise = self.precond.c_noise(sigmas.flatten()).to(self.param_dtype)
        conds = cond.repeat(len(group), *[1] * (cond.dim() - 1))
        out, states = self.model.run_level(level, network_in, c_noise, (start, extent), conds, sources)
        return self.precond.denoised(crops.double(), out.double(), sigmas).to(video.dtype), states

    # ---- coarser levels' activations --------------------------------------------------------
    def contexts(self, level, finished, cond, caches, region=None) -> list[Source]:
        """Level `level`'s activations on each of the options' `context_grids` token grids: its
        own, then its video rolled by g / n of a token along height and width."""
        n, (_, kh, kw) = self.options.context_grids, self.cfg.tokenizer_patch
        return [
            self.activations(level, finished, cond, caches, region, shift=(0, g * kh // n, g * kw // n))
            for g in range(n)
        ]

    @torch.no_grad()
    def activations(self, level, finished, cond, caches, region=None, shift=(0, 0, 0)) -> Source:
        """Level `level`'s activations entering each block, from its finished video seen at
        sigma_min, blended from its tiles with the tent window (at token resolution): over the
        whole level (the cache), or over the tiles reaching into `region` ((start, stop) pixels
        per axis) when recomputed for one finer tile. With `shift` (pixels, T, H, W) the video is
        rolled by it first (its tiles keep their places: the content moves), and the Source's box
        is moved back by it: its token grid lies `shift` pixels before the level's own."""
        cfg, video = self.cfg, torch.roll(finished[level - 1], shift, dims=(2, 3, 4))
        size = tuple(video.shape[2:])
        # a recomputed region needs no shift: it has a token's margin, and a shift is under a token
        tiles = [o for o in self._tiles(size) if region is None or _reaches(o, cfg.patch, region)]
        low = [min(o[a] for o in tiles) for a in range(3)]
        high = [max(o[a] for o in tiles) + cfg.patch[a] for a in range(3)]
        kernel, grid = cfg.tokenizer_patch, cfg.token_grid
        tokens = [(h - lo) // k for lo, h, k in zip(low, high, kernel)]
        window = pyramid.tile_weights(grid, video.device)
        sums: dict[int, torch.Tensor] = {}
        weight = torch.zeros(tokens, dtype=torch.float64, device=video.device)
        sigma = torch.full((video.shape[0],), self.cfg.edm.sigma_min, dtype=torch.float64)
        for group, sources in self._groups(level, tiles, size, cond, finished, caches):
            # seen at sigma_min: the finished video itself is the input (no noise is added)
            _, states = self._run_tiles(level, video, group, sigma, cond, sources)
            for i, offset in enumerate(group):
                at = [(o - lo) // k for o, lo, k in zip(offset, low, kernel)]
                for b, state in states.items():
                    part = state.chunk(len(group))[i].double()
                    total = sums.setdefault(b, part.new_zeros((*part.shape[:2], *tokens)))
                    _add(total, part * window, at, grid)
                _add(weight, window, at, grid)
        blended = {b: (s / weight).to(self.param_dtype) for b, s in sums.items()}
        whole = torch.tensor(size, dtype=torch.float64)
        low, high = torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64)
        start, extent = (low - torch.tensor(shift, dtype=torch.float64)) / whole, (high - low) / whole
        return Source(blended, (start.expand(video.shape[0], 3), extent.expand(video.shape[0], 3)))

    def _recompute(self, level, offset, size, cond, finished) -> list[Source]:
        """Without the cache: the coarser levels' activations one tile at `offset` of level `level`
        reads, from the coarser tiles reaching into its place (plus one coarser token around it,
        for the trilinear neighbours), each of them with its own coarser sources recomputed."""
        sources = []
        for k in range(1, level):
            coarse = finished[k - 1].shape[2:]
            region = []
            for a in range(3):
                scale, margin = coarse[a] / size[a], self.cfg.tokenizer_patch[a]
                region.append((offset[a] * scale - margin, (offset[a] + self.cfg.patch[a]) * scale + margin))
            sources.extend(self.contexts(k, finished, cond, None, region=region))
        return sources


def _crop(x, offset, sizes):
    (t, h, w), (st, sh, sw) = offset, sizes
    return x[:, :, t : t + st, h : h + sh, w : w + sw]


def _add(total, value, offset, sizes):
    """total[..., box] += value over the trailing three axes."""
    (t, h, w), (st, sh, sw) = offset, sizes
    total[..., t : t + st, h : h + sh, w : w + sw] += value


def _reaches(offset, patch, region) -> bool:
    return all(o < stop and o + p > start for o, p, (start, stop) in zip(offset, patch, region))


def _repeat_source(source: Source, times: int) -> Source:
    """A source for a batch of `times` tiles (tile-major)."""
    start, extent = source.box
    states = {b: s.repeat(times, 1, 1, 1, 1) for b, s in source.states.items()}
    return Source(states, (start.repeat(times, 1), extent.repeat(times, 1)))

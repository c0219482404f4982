"""HPDM's sampler (cogvideo/models/hpdm/sampler.py): overlapped tiling of a position-independent
model equals running it on the whole level; the steps per level (128 -> 64 -> 32 in the paper);
the activation cache gives the same video as recomputing every coarser tile a tile reads."""

import pytest
import torch
from test_hpdm_model import tiny_model

from cogvideo.diffusion import edm
from cogvideo.models.hpdm.config import HPDMConfig
from cogvideo.models.hpdm.sampler import PyramidOptions, PyramidSampler, level_steps

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = HPDMConfig(patch=(2, 8, 8), num_levels=3, temporal_scale=2, block_levels=(1, 2, 3), num_classes=5)


class Pointwise(torch.nn.Module):
    """A stand-in network that sees each pixel alone (position-independent): F = tanh(x) * (1 + c_noise)."""

    def __init__(self, mixing=False):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.mixing = mixing  # subtract the tile's mean: no longer position-independent
        self.calls = []

    def run_level(self, level, x, c_noise, box, cond, sources):
        self.calls.append((level, float(c_noise[0])))
        out = torch.tanh(x) * (1 + c_noise.view(-1, 1, 1, 1, 1))
        if self.mixing:
            out = out - out.mean(dim=(2, 3, 4), keepdim=True)
        return out, {}


def untiled(x, sigma):
    pre = edm.Preconditioner(CFG.edm)
    s = sigma.view(-1, 1, 1, 1, 1)
    return pre.denoised(x, torch.tanh(pre.c_in(x, s)) * (1 + pre.c_noise(s)), s)


@pytest.mark.parametrize(
    "size,overlaps", [((6, 24, 16), (0.5, 0.5)), ((4, 16, 24), (0.0, 0.0)), ((2, 8, 8), (0.5, 0.5))]
)
def test_overlapped_tiles_of_a_position_independent_model_equal_the_untiled_result(size, overlaps):
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 3.0], dtype=torch.float64)
    options = PyramidOptions(temporal_overlap=overlaps[0], overlap=overlaps[1], tiles_per_batch=4)
    sampler = PyramidSampler(Pointwise(), CFG, options)
    got = sampler.denoise(1, x, sigma, torch.zeros(2, dtype=torch.long), [], [])
    assert torch.allclose(got, untiled(x, sigma), rtol=1e-12, atol=1e-12)
    if size != CFG.patch:  # sharp: a model that mixes pixels within its tile is not tile-invariant
        mixing = PyramidSampler(Pointwise(mixing=True), CFG, options)
        assert not torch.allclose(
            mixing.denoise(1, x, sigma, torch.zeros(2, dtype=torch.long), [], []), got, atol=1e-3
        )


def test_sizes_the_tiles_cannot_cover_are_refused_naming_the_size():
    sampler = PyramidSampler(Pointwise(), CFG, PyramidOptions())
    x = torch.zeros(1, 3, 2, 10, 8, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"\(2, 10, 8\) pixels is not tiled by \(2, 8, 8\) patches at stride 4"
    ):
        sampler.denoise(1, x, torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.long), [], [])


def test_steps_halve_per_level_and_only_level_1_is_second_order(monkeypatch):
    assert [level_steps(128, lv) for lv in (1, 2, 3)] == [128, 64, 32]
    evaluations, progress = [], []
    denoise = PyramidSampler.denoise
    monkeypatch.setattr(
        PyramidSampler, "denoise", lambda self, lv, *a: evaluations.append(lv) or denoise(self, lv, *a)
    )
    options = PyramidOptions(steps=8, stochastic=True)
    sampler = PyramidSampler(Pointwise(), CFG, options, on_step=lambda lv, i, n: progress.append((lv, i, n)))
    video = sampler.sample(
        torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.Generator()
    )
    assert video.shape == (1, 3, *CFG.video_size)
    assert progress == [(lv, i, n) for lv, n in ((1, 8), (2, 4), (3, 2)) for i in range(1, n + 1)]
    # level 1: Heun, two evaluations a step but the last (to sigma 0); levels 2, 3: one Euler
    # evaluation a step
    assert [evaluations.count(lv) for lv in (1, 2, 3)] == [2 * 8 - 1, 4, 2]


TWO_LEVELS = HPDMConfig(
    patch=(2, 8, 8),
    num_levels=2,
    block_levels=(1, 2, 2),
    interface_dim=16,
    latent_dim=16,
    num_latents=4,
    head_dim=8,
    cond_dim=16,
    num_classes=5,
)


@pytest.mark.parametrize("grids", [1, 2, 4])
def test_cached_and_uncached_samplers_give_the_same_video(monkeypatch, grids):
    """Two levels at 1.5x the trained side (level 1 in 2x2 tiles, level 2 in 5x5), guided: the
    cache (coarser activations kept per level) equals recomputing, for every finer tile at every
    step, the coarser tiles it reads; also with the context on several token grids."""
    model = tiny_model(TWO_LEVELS)
    cond, uncond = torch.tensor([1, 3]), torch.tensor([5, 5])

    def sample(cache):
        options = PyramidOptions(
            steps=2, cache=cache, guidance_scale=2.0, tiles_per_batch=8, context_grids=grids
        )
        return PyramidSampler(model, TWO_LEVELS, options).sample(
            cond, uncond, torch.Generator().manual_seed(3), output=(2, 24, 24)
        )

    cached = sample(True)
    assert cached.shape == (2, 3, 2, 24, 24)
    assert torch.allclose(cached, sample(False), rtol=1e-9, atol=1e-10)
    # sharp: a cache slightly off (its activations shifted by 1e-3) changes the video
    original = PyramidSampler.activations

    def shifted(self, *args, **kwargs):
        source = original(self, *args, **kwargs)
        return type(source)({b: s + 1e-3 for b, s in source.states.items()}, source.box)

    monkeypatch.setattr(PyramidSampler, "activations", shifted)
    assert not torch.allclose(cached, sample(True), rtol=1e-9, atol=1e-10)


def test_seam_contrast_finds_tile_edges_and_no_seams_in_blended_tiles():
    """A video whose tiles were each shifted in brightness shows its edges; the sampler's blend of
    a position-independent model over a smooth video shows none (across within inside's range)."""
    from cogvideo.models.hpdm.pyramid import seam_contrast, tile_offsets

    size, overlaps = (2, 24, 24), (0.0, 0.5)
    t = torch.linspace(0, 1, 24, dtype=torch.float64)
    smooth = (t[None, :] + t[:, None]).expand(3, 2, 24, 24).clone()
    across, inside = seam_contrast(CFG, smooth, overlaps)
    assert abs(across / inside - 1) < 1e-9  # a ramp changes alike everywhere
    seamed = smooth.clone()
    for i, (a, b, c) in enumerate(tile_offsets(CFG, size, overlaps)[::2]):  # non-overlapping tiles shifted
        seamed[:, a : a + 2, b : b + 8, c : c + 8] += 0.1 * (i % 3)
    across, inside = seam_contrast(CFG, seamed, overlaps)
    assert across > 2 * inside
    sampler = PyramidSampler(Pointwise(), CFG, PyramidOptions(temporal_overlap=0.0, overlap=0.5))
    x = smooth[None] * 3
    blended = sampler.denoise(
        1, x, torch.tensor([0.5], dtype=torch.float64), torch.zeros(1, dtype=torch.long), [], []
    )
    across, inside = seam_contrast(CFG, blended[0], overlaps)
    assert across <= inside * (1 + 1e-9)


@pytest.mark.parametrize("grids", [2, 4])
def test_context_grids_hold_the_rolled_tokens_at_their_own_places(grids):
    """`context_grids`: grid g of a coarser level is its video rolled by g / n of a token; its
    Source's box starts that many pixels before the level, so its token j holds the level's pixels
    [k j - s, k j + k - s) (away from the wrapped edge). With the token's state entering block 0
    the tokenizer's map of its pixels alone (coordinates zeroed), that is checked pixel for pixel;
    the finer level reads the mean over the grids (planted: a box not moved back, or moved the
    wrong way, fails)."""
    cfg = TWO_LEVELS.replace(block_levels=(2, 2))  # block 0 reads level 1's tokens as tokenized
    model = tiny_model(cfg).double()
    with torch.no_grad():
        model.coordinates.weight.zero_(), model.coordinates.bias.zero_()
    size, (_, k, _) = (2, 16, 16), cfg.tokenizer_patch  # level 1 in 3x3 tiles
    video = torch.randn(1, 3, *size, dtype=torch.float64)
    sampler = PyramidSampler(model, cfg, PyramidOptions(context_grids=grids))
    sources = sampler.contexts(1, [video], torch.tensor([1]), [])
    assert len(sources) == grids
    c_in = sampler.precond.c_in(
        torch.ones((), dtype=torch.float64), torch.tensor(cfg.edm.sigma_min, dtype=torch.float64)
    )
    for g, source in enumerate(sources):
        s = g * k // grids
        start, extent = source.box
        torch.testing.assert_close(start[0], torch.tensor([0.0, -s / 16, -s / 16], dtype=torch.float64))
        torch.testing.assert_close(extent[0], torch.ones(3, dtype=torch.float64))
        state = source.states[0][0]  # [D, t, h, w]
        for i in range(1, size[1] // k):  # token rows and columns not wrapped
            for j in range(1, size[2] // k):
                pixels = video[0, :, :, i * k - s : i * k + k - s, j * k - s : j * k + k - s] * c_in
                expected = model.tokenizer(pixels.permute(1, 0, 2, 3).flatten(1))  # [t, D]
                torch.testing.assert_close(state[:, :, i, j].T, expected, rtol=1e-10, atol=1e-10)

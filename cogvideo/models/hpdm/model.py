"""HPDM's network: Recurrent Interface Network blocks over a patch pyramid, with deep context
fusion and adaptive computation, built plain (nn.Linear / nn.Embedding / nn.LayerNorm) and
sharded by `TP_PLAN`.

One level's patch [B, 3, T, H, W] (EDM's c_in-scaled noisy pixels) is cut into interface tokens
(`tokenizer_patch` pixels each, a linear map to `interface_dim`, plus a linear map of the token's
raw coordinates). A set of learned latents (plus, for captions, the caption's tokens) reads from
the interface, thinks in `latent_layers` self-attention layers and writes back, once per RIN
block. The noise level, the class or pooled caption and the level's index modulate every
latent-side LayerNorm (scale and shift). Before each block, a finer level adds its fused
context: the mean over the coarser levels of their interface activations entering that block,
sampled (trilinear) at the finer patch's token centres, concatenated with its own and projected.
Block b runs only levels 1..block_levels[b]; the last block runs all of them.

    out = model(x, c_noise, start, extent, cond)          # all levels of one pyramid, jointly
    out, states = model.run_level(level, x, c_noise, (start, extent), cond, sources)   # one level
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cogvideo.models.hpdm import pyramid
from cogvideo.models.hpdm.config import COORDINATES, HPDMConfig
from cogvideo.sdpa import sdpa
from cogvideo.tp_plan import Column, Row, TPPlan

TIME_FEATURES = 256  # sinusoidal features of c_noise
SMOOTH_KERNEL = (1, 3, 3)  # `output_conv`'s kernel (frames, rows, columns)

# attention heads split over TP ranks (queries, keys/values, output), feed-forwards split by their
# hidden units; embeddings, norms, modulations, fusion and the tokenizer stay whole
TP_PLAN = TPPlan(
    {
        "qkv": Column(stride=3),
        "q": Column(),
        "kv": Column(stride=2),
        "out": Row(),
        "fc1": Column(),
        "fc2": Row(),
    },
    blocks="blocks",
)


class ModulatedNorm(nn.Module):
    """LayerNorm whose scale and shift come from the condition vector (FiLM / adaLN)."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(cond).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


def _norm(norm: nn.Module, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """A LayerNorm, or a ModulatedNorm given the condition vector."""
    return norm(x, cond) if isinstance(norm, ModulatedNorm) else norm(x)


class Attention(nn.Module):
    """Multi-head attention; queries from x, keys and values from `context` (x itself when None).
    Under TP each rank holds its share of the heads: the head count is read off the layer."""

    def __init__(self, dim: int, inner: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        if context_dim is None:
            self.qkv = nn.Linear(dim, 3 * inner)
        else:
            self.q = nn.Linear(dim, inner)
            self.kv = nn.Linear(context_dim, 2 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, (k, v) = self.q(x), self.kv(context).chunk(2, dim=-1)
        heads = q.shape[-1] // self.head_dim
        q, k, v = (t.unflatten(-1, (heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        mixed = sdpa(q, k, v)
        return self.out(mixed.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, mult * dim), nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LatentLayer(nn.Module):
    def __init__(self, cfg: HPDMConfig):
        super().__init__()
        dim = cfg.latent_dim
        self.attn_norm, self.ff_norm = ModulatedNorm(dim, cfg.cond_dim), ModulatedNorm(dim, cfg.cond_dim)
        self.attn, self.ff = Attention(dim, dim, cfg.head_dim), FeedForward(dim, cfg.ffn_mult)

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        z = z + self.attn(self.attn_norm(z, cond))
        return z + self.ff(self.ff_norm(z, cond))


class RINBlock(nn.Module):
    """Read (latents <- interface), think (latent self-attention), write (interface <- latents);
    with `fuses`, a finer level's interface first takes in its context (deep context fusion); with
    `interface_attention`, the interface tokens then attend to each other before the read."""

    def __init__(self, cfg: HPDMConfig, fuses: bool):
        super().__init__()
        di, dl, c = cfg.interface_dim, cfg.latent_dim, cfg.cond_dim
        self.fuse = nn.Linear(2 * di, di) if fuses else None
        # interface self-attention: a token compares itself with every other token of its patch
        # (other frames included) directly, not only through what the latents kept
        self.mix_norm = nn.LayerNorm(di) if cfg.interface_attention else None
        self.mix = Attention(di, di, cfg.head_dim) if cfg.interface_attention else None
        self.read_latents, self.read_interface = ModulatedNorm(dl, c), nn.LayerNorm(di)
        self.read = Attention(dl, di, cfg.head_dim, context_dim=di)
        self.read_ff_norm, self.read_ff = ModulatedNorm(dl, c), FeedForward(dl, cfg.ffn_mult)
        self.latent_layers = nn.ModuleList(LatentLayer(cfg) for _ in range(cfg.latent_layers))
        self.write_interface, self.write_latents = nn.LayerNorm(di), nn.LayerNorm(dl)
        self.write = Attention(di, di, cfg.head_dim, context_dim=dl)
        self.write_ff_norm = ModulatedNorm(di, c) if cfg.interface_modulation else nn.LayerNorm(di)
        self.write_ff = FeedForward(di, cfg.ffn_mult)

    def forward(self, x, z, cond, context=None):
        if context is not None:
            x = x + self.fuse(torch.cat([x, context], dim=-1))
        if self.mix is not None:
            x = x + self.mix(self.mix_norm(x))
        z = z + self.read(self.read_latents(z, cond), self.read_interface(x))
        z = z + self.read_ff(self.read_ff_norm(z, cond))
        for layer in self.latent_layers:
            z = layer(z, cond)
        x = x + self.write(self.write_interface(x), self.write_latents(z))
        return x + self.write_ff(_norm(self.write_ff_norm, x, cond)), z


def tent(length: int, device=None, dtype=None) -> torch.Tensor:
    """A footprint's blending weights along one side: 2k pixels centred on a token of k, each
    (k - |distance from the token's centre|) / k; two neighbours' weights sum to one."""
    k = length // 2
    centre = torch.arange(length, device=device, dtype=dtype) + 0.5 - k
    return 1 - centre.abs() / k


def overlap_add(footprints: torch.Tensor, token: tuple[int, int, int]) -> torch.Tensor:
    """[B, t, h, w, 3 * kt * 2kh * 2kw] per-token footprints (each centred on its token) -> pixels
    [B, 3, t * kt, h * kh, w * kw]: each pixel the tent-weighted mean of the footprints covering it
    (its two nearest tokens along height and width; one at the patch's outer half-tokens)."""
    kt, kh, kw = token
    t, h, w = footprints.shape[1:4]
    weight = (
        tent(2 * kh, footprints.device, footprints.dtype)[:, None]
        * tent(2 * kw, footprints.device, footprints.dtype)[None, :]
    )
    per_channel = kt * 4 * kh * kw  # a footprint's pixels of one colour channel
    # conv_transpose3d's kernel: input channel (c, a, i, j) goes to output channel c at (a, i, j)
    placed = torch.eye(per_channel, device=footprints.device, dtype=footprints.dtype)
    placed = placed.view(per_channel, kt, 2 * kh, 2 * kw) * weight
    kernel = footprints.new_zeros(3, per_channel, 3, kt, 2 * kh, 2 * kw)
    for c in range(3):
        kernel[c, :, c] = placed
    kernel, channels = kernel.flatten(0, 1), 3 * per_channel
    place = dict(stride=(kt, kh, kw), padding=(0, kh // 2, kw // 2))
    total = F.conv_transpose3d(footprints.permute(0, 4, 1, 2, 3), kernel, **place)
    ones = footprints.new_ones(1, channels, t, h, w)
    return total / F.conv_transpose3d(ones, kernel, **place)[:, :1]


@dataclass
class Source:
    """A coarser level's interface activations entering each block, [B, D, t, h, w] on its token
    grid, and the box (start, extent [B, 3]) that grid covers (a training patch, or a whole level)."""

    states: dict[int, torch.Tensor]
    box: tuple[torch.Tensor, torch.Tensor]


class HPDMModel(nn.Module):
    def __init__(self, cfg: HPDMConfig):
        super().__init__()
        self.cfg = cfg.validate()
        di, c = cfg.interface_dim, cfg.cond_dim
        self.tokenizer = nn.Linear(cfg.pixels_per_token, di)
        self.coordinates = nn.Linear(COORDINATES, di)
        if cfg.position_embeddings:
            t, h, w = cfg.token_grid
            self.space_positions = nn.Parameter(torch.empty(h * w, di))
            self.time_positions = nn.Parameter(torch.empty(t, di))
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, cfg.latent_dim))
        self.time_fc1, self.time_fc2 = nn.Linear(TIME_FEATURES, c), nn.Linear(c, c)
        self.level_embeddings = nn.Embedding(cfg.num_levels, c)
        if cfg.condition == "class":
            self.class_embeddings = nn.Embedding(cfg.num_classes + 1, c)  # the last row: null class
        else:
            self.text_embeddings = nn.Embedding(cfg.vocab.num_text_tokens, cfg.text_dim)
            self.text_positions = nn.Embedding(cfg.text_length, cfg.text_dim)
            self.text_tokens = nn.Linear(cfg.text_dim, cfg.latent_dim)
            if cfg.piece_conditioning:
                self.piece_embeddings = nn.Embedding(cfg.vocab.num_text_tokens, c)
            else:
                self.text_pooled = nn.Linear(cfg.text_dim, c)
        self.blocks = nn.ModuleList(RINBlock(cfg, fuses=levels > 1) for levels in cfg.block_levels)
        self.head_norm = ModulatedNorm(di, c) if cfg.interface_modulation else nn.LayerNorm(di)
        self.head = nn.Linear(di, 3 * math.prod(cfg.head_footprint))
        # a 1x3x3 convolution over the head's pixels (U-ViT's last layer): a pixel's output also reads
        # its neighbours across the token borders, which the per-token head cannot
        self.smooth = nn.Conv3d(3, 3, SMOOTH_KERNEL, padding=(0, 1, 1)) if cfg.output_conv else None

    # ---- conditioning ----------------------------------------------------------------------
    def condition(self, level: int, c_noise: torch.Tensor, cond: torch.Tensor):
        """-> (the modulating vector [B, cond_dim], extra latent tokens [B, n, latent_dim] or None)."""
        half = TIME_FEATURES // 2
        dtype = self.time_fc1.weight.dtype
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device, dtype=dtype) / half)
        angles = c_noise.to(dtype)[:, None] * 1000.0 * freqs[None]
        time = self.time_fc2(F.silu(self.time_fc1(torch.cat([angles.cos(), angles.sin()], dim=-1))))
        vector = time + self.level_embeddings.weight[level - 1]
        extra = None
        if self.cfg.condition == "class":
            vector = vector + self.class_embeddings(cond)
        else:
            text = self.text_embeddings(cond) + self.text_positions.weight[: cond.shape[1]]
            if self.cfg.piece_conditioning:  # each piece's own row, summed over the non-padding ones
                pieces = (cond != self.cfg.vocab.pad_piece_id).unsqueeze(-1).to(vector.dtype)
                vector = vector + (self.piece_embeddings(cond) * pieces).sum(dim=1)
            else:
                vector = vector + self.text_pooled(text.mean(dim=1))
            extra = self.text_tokens(text)
        return F.silu(vector), extra

    # ---- tokens <-> pixels -----------------------------------------------------------------
    def tokenize(self, x: torch.Tensor, box) -> torch.Tensor:
        kt, kh, kw = self.cfg.tokenizer_patch
        B, C, T, H, W = x.shape
        pixels = x.reshape(B, C, T // kt, kt, H // kh, kh, W // kw, kw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        coords = pyramid.token_coordinates(self.cfg, *box).to(x.device, x.dtype)
        tokens = self.tokenizer(pixels.flatten(4).flatten(1, 3)) + self.coordinates(coords)
        if not self.cfg.position_embeddings:
            return tokens
        positions = self.time_positions[:, None] + self.space_positions[None]  # [t, h * w, di]
        return tokens + positions.flatten(0, 1)

    def detokenize(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Interface tokens -> pixels; `cond` the modulating vector (read with interface_modulation)."""
        kt, kh, kw = self.cfg.tokenizer_patch
        t, h, w = self.cfg.token_grid
        out = self.head(_norm(self.head_norm, tokens, cond))
        if self.cfg.head_overlap:
            return overlap_add(out.unflatten(1, (t, h, w)), self.cfg.tokenizer_patch)
        pixels = out.unflatten(-1, (3, kt, kh, kw)).unflatten(1, (t, h, w)).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return pixels.reshape(tokens.shape[0], 3, t * kt, h * kh, w * kw)

    # ---- one level, and the whole pyramid --------------------------------------------------
    def run_level(self, level: int, x, c_noise, box, cond, sources: list[Source]):
        """Level `level` (1-based) of a batch of patches: x [B, 3, *patch] (c_in-scaled), c_noise [B],
        box (start, extent [B, 3]), cond (class ids [B] or caption ids [B, L]), `sources` the coarser
        levels (1..level-1). Returns F [B, 3, *patch] and this level's activations entering the
        blocks finer levels run (a `Source`'s states, on this patch's token grid)."""
        cfg = self.cfg
        vector, extra = self.condition(level, c_noise, cond)
        x_tok = self.tokenize(x, box)
        z = self.latents.expand(x.shape[0], -1, -1)
        if extra is not None:
            z = torch.cat([z, extra], dim=1)
        grids = [pyramid.context_grid(cfg, box, source.box).to(x.device) for source in sources]
        states = {}
        for b, block in enumerate(self.blocks):
            if level + 1 in cfg.levels_of_block(b):  # finer levels read this level's state entering block b
                states[b] = x_tok.transpose(1, 2).unflatten(2, cfg.token_grid)
            if level not in cfg.levels_of_block(b):  # adaptive computation
                continue
            context = None
            if sources:
                sampled = [pyramid.sample_context(s.states[b], g) for s, g in zip(sources, grids)]
                context = torch.stack(sampled).mean(dim=0)
            x_tok, z = block(x_tok, z, vector, context)
        out = self.detokenize(x_tok, vector)
        return (out if self.smooth is None else self.smooth(out)), states

    def forward(self, x, c_noise, start, extent, cond):
        """Training: every level of a pyramid of patches jointly, x [B, levels, 3, *patch] (c_in-scaled),
        c_noise [B, levels], start / extent [B, levels, 3] -> F [B, levels, 3, *patch]."""
        outputs, sources = [], []
        for level in range(1, self.cfg.num_levels + 1):
            box = (start[:, level - 1], extent[:, level - 1])
            out, states = self.run_level(level, x[:, level - 1], c_noise[:, level - 1], box, cond, sources)
            outputs.append(out)
            sources.append(Source(states, box))
        return torch.stack(outputs, dim=1)


def init_weights(cfg: HPDMConfig, name: str, tensor: torch.Tensor) -> None:
    """normal(init_std) for matrices, tables and latents (the position tables: position_std); zeros for biases, the norm modulations
    (each block starts unmodulated) and the output head (F starts at 0: D = c_skip x); ones for
    LayerNorm weights; the identity for the output convolution."""
    if name == "smooth.weight":  # the identity: the convolution starts as no convolution
        nn.init.dirac_(tensor)
    elif name in ("space_positions", "time_positions"):
        nn.init.normal_(tensor, std=cfg.position_std)
    elif name.endswith("bias") or ".modulation." in name or name.startswith("head."):
        nn.init.zeros_(tensor)
    elif tensor.dim() == 1:
        nn.init.ones_(tensor)
    else:
        nn.init.normal_(tensor, std=cfg.init_std)

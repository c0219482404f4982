"""The Coherence and Realism Adversarial (CRA) loss (paper Sec. 3.1, Eq. 10).

Two frames i < j of a video, real (x) and generated (x̄, the VAE's decoding of the decoder's
one-step x0 estimate, Eq. 9). The discriminator judges a pair by slot: slot 0 holds the frame
shown at index i, slot 1 the frame shown at index j (the indices stay with the slots, so a
swapped pair claims the wrong order):

    discriminator   real: <x_i, x_j>
                    fake: <x_i, x̄_j>, <x̄_i, x_j>, <x̄_i, x̄_j>  (realism), <x_j, x_i>, <x̄_j, x̄_i>  (coherence)
    generator       real: <x̄_i, x̄_j>, <x_i, x̄_j>, <x̄_i, x_j>  (the discriminator's fakes it must pass)

`PairDiscriminator`: the learned slot embeddings e_0, e_1 added to the two frames, residual
blocks conditioned on each frame's index embedding, full spatio-temporal attention over both
frames' positions at the attention resolutions, then a logit per pair.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from torch import nn

from cogvideo.models.glober.blocks import IndexEmbedding, spatial_attention
from cogvideo.models.glober.config import GloberConfig

# (slot 0, slot 1) as (source, frame): source "real" or "fake", frame 0 = x_i, 1 = x_j
DISCRIMINATOR_PAIRS = (
    (("real", 0), ("real", 1)),
    (("real", 0), ("fake", 1)),
    (("fake", 0), ("real", 1)),
    (("fake", 0), ("fake", 1)),
    (("real", 1), ("real", 0)),
    (("fake", 1), ("fake", 0)),
)
DISCRIMINATOR_LABELS = (1, 0, 0, 0, 0, 0)
GENERATOR_PAIRS = (
    (("fake", 0), ("fake", 1)),
    (("real", 0), ("fake", 1)),
    (("fake", 0), ("real", 1)),
)
GENERATOR_LABELS = (1, 1, 1)


def cra_pairs(real: torch.Tensor, fake: torch.Tensor, for_discriminator: bool):
    """Real and generated frames [B, 2, 3, H, W] (frames i, j) -> the pairs [P * B, 2, 3, H, W]
    (pair kind major) and their labels [P * B] (1: real) for the discriminator's or the
    generator's step."""
    pairs, labels = (
        (DISCRIMINATOR_PAIRS, DISCRIMINATOR_LABELS)
        if for_discriminator
        else (GENERATOR_PAIRS, GENERATOR_LABELS)
    )
    frames = {"real": real, "fake": fake}
    stacked = [torch.stack([frames[s0][:, f0], frames[s1][:, f1]], dim=1) for (s0, f0), (s1, f1) in pairs]
    targets = torch.tensor(labels, dtype=torch.float32, device=real.device).repeat_interleave(real.shape[0])
    return torch.cat(stacked), targets


def adversarial_loss(logits: torch.Tensor, labels: torch.Tensor, kinds: int, kind: str) -> torch.Tensor:
    """`bce`: Eq. 10, the log-likelihood of every pair's label summed over the pair kinds and
    averaged over the batch (binary cross-entropy). `hinge`: the released code's
    mean(relu(1 - logit * (2 label - 1)))."""
    if kind == "hinge":
        return F.relu(1 - logits.float() * (2 * labels - 1)).mean()
    return kinds * F.binary_cross_entropy_with_logits(logits.float(), labels)


class PairStage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb: int, head_ch: int, groups: int, attend: bool):
        super().__init__()
        self.resnet = ResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=temb, groups=groups)
        self.attention = spatial_attention(out_ch, head_ch, groups) if attend else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """h [2B, C, H, W] (each pair's two frames adjacent), temb [2B, temb]."""
        h = self.resnet(h, temb)
        if self.attention is None:
            return h
        n, c, size = h.shape[0] // 2, h.shape[1], h.shape[-1]
        tokens = h.unflatten(0, (n, 2)).permute(0, 2, 1, 3, 4).reshape(n, c, 2 * size, size)  # both frames
        tokens = self.attention(tokens)  # full attention over 2 * H * W positions
        return tokens.reshape(n, c, 2, size, size).permute(0, 2, 1, 3, 4).flatten(0, 1)


class PairDiscriminator(nn.Module):
    def __init__(self, cfg: GloberConfig):
        super().__init__()
        d, size = cfg.discriminator, cfg.frame_size
        temb = 4 * d.channels
        self.slot_embeddings = nn.Parameter(torch.empty(2, 3, size, size))  # e_0, e_1
        self.index_embedding = IndexEmbedding(d.channels, temb, cfg.decoder.index_scale)
        self.conv_in = nn.Conv2d(3, d.channels, 3, padding=1)
        self.stages, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        ch = d.channels
        for level, mult in enumerate(d.channel_mult):
            for _ in range(d.num_res_blocks):
                attend = size in d.attention_resolutions
                self.stages.append(
                    PairStage(ch, d.channels * mult, temb, d.head_channels, d.norm_groups, attend)
                )
                ch = d.channels * mult
            if level < len(d.channel_mult) - 1:
                self.downsamplers.append(Downsample2D(ch, use_conv=True, padding=1, name="op"))
                size //= 2
        self.blocks_per_level = d.num_res_blocks
        self.head = nn.Sequential(
            nn.Conv2d(ch, d.channels, 3, padding=1),
            nn.GroupNorm(math.gcd(d.norm_groups, d.channels), d.channels),
            nn.SiLU(),
        )
        self.logit = nn.Linear(d.channels, 1)

    def forward(self, pairs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Frame pairs [N, 2, 3, H, W] and their slots' normalised indices [N, 2] -> logits [N]."""
        x = pairs + self.slot_embeddings.to(pairs.dtype)
        temb = self.index_embedding(indices)
        h = self.conv_in(x.flatten(0, 1))
        for i, stage in enumerate(self.stages):
            h = stage(h, temb)
            level, last_in_level = divmod(i + 1, self.blocks_per_level)
            if last_in_level == 0 and level - 1 < len(self.downsamplers):
                h = self.downsamplers[level - 1](h)
        pooled = self.head(h).mean(dim=(2, 3)).unflatten(0, (pairs.shape[0], 2)).mean(1)
        return self.logit(pooled).squeeze(-1)

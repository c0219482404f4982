"""Building blocks shared by GLOBER's networks, all made of diffusers' layers.

- `spatial_attention`: self-attention over one frame's positions (diffusers' `Attention` with
  its group norm and residual, on [N, C, H, W]);
- `TemporalAttention`: self-attention across the frames at each position, with a learned
  position per frame slot (attention alone cannot tell frame order);
- `IndexEmbedding`: a normalised index (or a timestep) -> sinusoidal features -> MLP, diffusers'
  `Timesteps` + `TimestepEmbedding` (the paper's "similar to the timestep embedding layer");
- `zero_conv`: a 1x1 convolution starting at zero (ControlNet's zero convolution).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


def spatial_attention(channels: int, head_channels: int, groups: int) -> Attention:
    return Attention(
        channels,
        heads=channels // head_channels,
        dim_head=head_channels,
        norm_num_groups=groups,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
    )


class TemporalAttention(nn.Module):
    """Attention across T frames at every spatial position of [B, T, C, H, W]."""

    def __init__(self, channels: int, head_channels: int, groups: int, max_frames: int):
        super().__init__()
        self.positions = nn.Parameter(torch.zeros(max_frames, channels))
        self.attention = spatial_attention(channels, head_channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        tokens = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c) + self.positions[:t]
        tokens = self.attention(tokens) - self.positions[:t]  # the residual keeps only what attention adds
        return tokens.reshape(b, h, w, t, c).permute(0, 3, 4, 1, 2)


class IndexEmbedding(nn.Module):
    def __init__(self, channels: int, out_channels: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.sinusoid = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(channels, out_channels)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        features = self.sinusoid(index.flatten().float() * self.scale)
        return self.mlp(features.to(self.mlp.linear_1.weight.dtype))


def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """Zero-initialised by the family's init (`init.py` matches the name `zero_convs`)."""
    return nn.Conv2d(in_channels, out_channels, 1)

"""The video encoder (paper Sec. 3.1, "Video Encoding"): keyframe latents -> a 2D global feature.

    [e_v : z_q1 : ... : z_qK]   the learnable video-content embedding e_v before K keyframe latents
    -> input layer              a 2D 3x3 convolution per frame, C' -> D channels (with
                                `encoder.input_positions`: plus a learned D-vector per frame slot)
    -> downsample module        per level: residual blocks, spatial + temporal attention (at the
                                attention resolutions), a downsampling convolution (f_video overall)
    -> mapping module           residual block, spatial + temporal attention, temporal split
                                (only e_v's slot goes on)
    -> output module            3x3 conv, group norm, SiLU, 1x1 conv -> mean and log-variance
                                (with `encoder.output_temporal_kernel: 3` the first conv is 3D and
                                runs before the split: e_v's output reads the first keyframe's slot
                                too, as the released code's `out_vc`)
    -> DiagonalGaussianDistribution (diffusers'): v = mean + std * n, KL to N(0, I) (Eq. 1, 2)

Convolutions and residual blocks act on each frame alone (2D); frames meet only in the temporal
attention, whose learned slot positions tell the frames' order apart. Those positions enter only
the attention's weights and values, and the trained demo encoder lost them (a video and its
reverse 0.6 % apart); `input_positions` tags every frame's features with its slot from the input
layer on, so the residual blocks' nonlinearities compute features of (content, time) jointly.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from torch import nn

from cogvideo.models.glober.blocks import TemporalAttention, spatial_attention
from cogvideo.models.glober.config import GloberConfig

LOGVAR_BIAS = "conv_out.3.bias"  # the output head's bias: mean channels, then log-variance channels


class EncoderStage(nn.Module):
    """A residual block, then (if `attend`) spatial and temporal attention, on [B, T, C, H, W]."""

    def __init__(self, in_ch: int, out_ch: int, head_ch: int, groups: int, frames: int, attend: bool):
        super().__init__()
        self.resnet = ResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=None, groups=groups)
        self.spatial = spatial_attention(out_ch, head_ch, groups) if attend else None
        self.temporal = TemporalAttention(out_ch, head_ch, groups, frames) if attend else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        h = self.resnet(x.flatten(0, 1), None)
        if self.spatial is not None:
            h = self.spatial(h)
        h = h.unflatten(0, (b, t))
        return self.temporal(h) if self.temporal is not None else h


class VideoEncoder(nn.Module):
    def __init__(self, cfg: GloberConfig):
        super().__init__()
        enc, latent_ch, size = cfg.encoder, cfg.vae.latent_channels, cfg.latent_size
        frames = enc.num_keyframes + 1
        self.video_content = nn.Parameter(torch.empty(latent_ch, size, size))  # e_v
        k = enc.temporal_kernel
        self.conv_in = (
            nn.Conv2d(latent_ch, enc.channels, 3, padding=1)
            if k == 1
            else nn.Conv3d(latent_ch, enc.channels, (k, 3, 3), padding=(k // 2, 1, 1))
        )
        self.input_positions = (
            nn.Parameter(torch.empty(frames, enc.channels)) if enc.input_positions else None
        )
        self.stages = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        ch = enc.channels
        for level, mult in enumerate(enc.channel_mult):
            attend = size in enc.attention_resolutions
            for _ in range(enc.num_res_blocks):
                self.stages.append(
                    EncoderStage(ch, enc.channels * mult, enc.head_channels, enc.norm_groups, frames, attend)
                )
                ch = enc.channels * mult
            if level < len(enc.channel_mult) - 1:
                self.downsamplers.append(Downsample2D(ch, use_conv=True, padding=1, name="op"))
                size //= 2
        self.blocks_per_level = enc.num_res_blocks
        self.mapping = EncoderStage(ch, ch, enc.head_channels, enc.norm_groups, frames, attend=True)
        ko = enc.output_temporal_kernel
        self.conv_out = nn.Sequential(
            nn.Conv2d(ch, enc.out_channels, 3, padding=1)
            if ko == 1
            else nn.Conv3d(ch, enc.out_channels, (ko, 3, 3), padding=(ko // 2, 1, 1)),
            nn.GroupNorm(math.gcd(enc.norm_groups, enc.out_channels), enc.out_channels),
            nn.SiLU(),
            nn.Conv2d(enc.out_channels, 2 * enc.out_channels, 1),
        )

    def input_features(self, x: torch.Tensor) -> torch.Tensor:
        """The input layer: slots [B, 1 + K, C', L, L] -> [B, 1 + K, D, L, L]."""
        if isinstance(self.conv_in, nn.Conv3d):  # over [B, C', T, L, L]: the slots are its depth
            h = self.conv_in(x.transpose(1, 2)).transpose(1, 2)
        else:
            h = self.conv_in(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        if self.input_positions is not None:
            h = h + self.input_positions.to(h.dtype)[:, :, None, None]
        return h

    def forward(self, keyframes: torch.Tensor) -> DiagonalGaussianDistribution:
        """Keyframe latents [B, K, C', L, L] -> the posterior over global features [B, C'', G, G]."""
        b = keyframes.shape[0]
        content = self.video_content.to(keyframes.dtype).expand(b, 1, *self.video_content.shape)
        h = self.input_features(torch.cat([content, keyframes], dim=1))
        for i, stage in enumerate(self.stages):
            h = stage(h)
            level, last_in_level = divmod(i + 1, self.blocks_per_level)
            if last_in_level == 0 and level - 1 < len(self.downsamplers):
                h = self.downsamplers[level - 1](h.flatten(0, 1)).unflatten(0, h.shape[:2])
        return DiagonalGaussianDistribution(self.output(self.mapping(h)))

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """The temporal split and the output module: slots [B, 1 + K, C, G, G] -> e_v's slot's
        moments [B, 2 C'', G, G]. A 3D first convolution's output at slot 0 reads slots 0..k // 2
        (zero padding before e_v), so only those run through it."""
        first, rest = self.conv_out[0], self.conv_out[1:]
        if isinstance(first, nn.Conv3d):
            reach = first.kernel_size[0] // 2
            return rest(first(h[:, : reach + 1].transpose(1, 2))[:, :, 0])
        return rest(first(h[:, 0]))  # the temporal split: e_v's slot carries the video

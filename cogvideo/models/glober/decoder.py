"""The video decoder (paper Sec. 3.1, "Video Decoding"): one frame's latents from noise, given
the global feature and the frame's normalised index. No temporal module: every frame is its own
row of the batch, so any set of indices decodes independently, in any batch.

- UNet: diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x's layout at the paper's sizes:
  cross-attention blocks at the attention resolutions, the timestep embedding in every residual
  block). It cross-attends to the global feature as tokens (`GlobalProjector`, the released
  code's global projector).
- Additional modules (`GlobalGuidance`): the index embedding (diffusers' timestep embedding of
  the normalised index) conditions residual blocks over the global feature, one per UNet level;
  their multi-scale features enter the UNet through zero convolutions, as diffusers' ControlNet
  residuals (`down_block_additional_residuals`, `mid_block_additional_residual`).

Classifier-free guidance drops the global feature: the null condition is a zero global feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from cogvideo.models.glober.blocks import IndexEmbedding, zero_conv
from cogvideo.models.glober.config import GloberConfig

UNET_SHAPE_KEYS = (
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "in_channels",
    "down_block_types",
)


def unet_config(cfg: GloberConfig) -> dict:
    dec = cfg.decoder
    sizes = [cfg.latent_size // 2**level for level in range(len(dec.channel_mult))]
    attend = [size in dec.attention_resolutions for size in sizes]
    return dict(
        sample_size=cfg.latent_size,
        in_channels=cfg.vae.latent_channels,
        out_channels=cfg.vae.latent_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)],
        block_out_channels=[dec.channels * m for m in dec.channel_mult],
        layers_per_block=dec.num_res_blocks,
        cross_attention_dim=dec.context_dim,
        attention_head_dim=dec.num_heads,  # diffusers' SD 1.x naming: this is the head count
        norm_num_groups=dec.norm_groups,
    )


class GlobalProjector(nn.Module):
    """Global feature [N, C'', G, G] -> cross-attention tokens [N, (G/2)^2, context_dim]."""

    def __init__(self, in_channels: int, context_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, context_dim, 7, stride=2, padding=3)
        self.conv2 = nn.Conv2d(context_dim, context_dim, 3, padding=1)

    def forward(self, global_feature: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.silu(self.conv1(global_feature))).flatten(2).transpose(1, 2)


class GlobalGuidance(nn.Module):
    """The additional modules: (global feature, frame index) -> residuals for every UNet skip
    connection (conv_in, each residual block, each downsampler) and for the mid block."""

    def __init__(self, cfg: GloberConfig):
        super().__init__()
        dec = cfg.decoder
        widths = [dec.channels * m for m in dec.channel_mult]
        temb = 4 * dec.channels
        self.sizes = [cfg.latent_size // 2**level for level in range(len(widths))]
        self.index_embedding = IndexEmbedding(dec.channels, temb, dec.index_scale)
        self.conv_in = nn.Conv2d(cfg.encoder.out_channels, widths[0], 3, padding=1)
        self.level_blocks = nn.ModuleList(
            ResnetBlock2D(
                in_channels=widths[max(i - 1, 0)], out_channels=w, temb_channels=temb, groups=dec.norm_groups
            )
            for i, w in enumerate(widths)
        )
        # (level whose feature feeds the residual, the UNet's channels there), in the UNet's order
        self.slots = [(0, widths[0])]
        for level, width in enumerate(widths):
            self.slots += [(level, width)] * dec.num_res_blocks
            if level < len(widths) - 1:
                self.slots.append((level + 1, width))
        self.zero_convs = nn.ModuleList(zero_conv(widths[src], ch) for src, ch in self.slots)
        self.mid_zero_conv = zero_conv(widths[-1], widths[-1])

    def forward(self, global_feature: torch.Tensor, index: torch.Tensor):
        temb = self.index_embedding(index)
        h = self.conv_in(global_feature)
        features = []
        for size, block in zip(self.sizes, self.level_blocks):
            if h.shape[-1] != size:
                h = F.interpolate(h, size=(size, size), mode="nearest")
            h = block(h, temb)
            features.append(h)
        down = tuple(conv(features[src]) for conv, (src, _) in zip(self.zero_convs, self.slots))
        return down, self.mid_zero_conv(features[-1])


class VideoDecoder(nn.Module):
    def __init__(self, cfg: GloberConfig):
        super().__init__()
        self.unet = UNet2DConditionModel(**unet_config(cfg))
        self.projector = GlobalProjector(cfg.encoder.out_channels, cfg.decoder.context_dim)
        self.guidance = GlobalGuidance(cfg)

    def forward(
        self, noisy: torch.Tensor, timestep: torch.Tensor, global_feature: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Noisy latents [N, C', L, L] at timesteps [N], global features [N, C'', G, G] and
        normalised indices [N] -> the UNet's prediction (epsilon by default) [N, C', L, L]."""
        down, mid = self.guidance(global_feature, index)
        return self.unet(
            noisy,
            timestep,
            encoder_hidden_states=self.projector(global_feature),
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample

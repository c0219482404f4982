"""Inception-v1 I3D (Carreira & Zisserman 2017) in PyTorch, laid out like DeepMind's Kinetics-400 model.

Module names follow the TF/Flax scopes (``Mixed_4b.Branch_1.Conv3d_0b_3x3``) so the
converted weights map one to one (see :mod:`cogvideo.eval.i3d_convert`). Behaviour matches
the original: TF "SAME" padding (the extra pixel goes after, not before), max pools padded
with -inf, batch norm without scale and eps 1e-3, input ``[-1, 1]``, logits averaged over
the remaining time steps.

Input ``[B, 3, T, H, W]``; the reference protocol is T=16 (any T >= 9) and H=W=224.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 400
POOL_FEATURES = 1024
BN_EPS = 1e-3

# (branch_0 1x1, branch_1 1x1, branch_1 3x3, branch_2 1x1, branch_2 3x3, branch_3 pool-proj)
INCEPTION_CHANNELS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


def same_padding(
    x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], value: float = 0.0
) -> torch.Tensor:
    """Pad the trailing len(kernel) dims as TF 'SAME' does: output = ceil(input / stride)."""
    pads: list[int] = []
    for size, k, s in zip(reversed(x.shape[-len(kernel) :]), reversed(kernel), reversed(stride)):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


def max_pool_same(
    x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]
) -> torch.Tensor:
    return F.max_pool3d(same_padding(x, kernel, stride, value=-math.inf), kernel, stride)


class Unit3D(nn.Module):
    """Conv3d (TF 'SAME') -> BatchNorm (no scale) -> ReLU, or a plain biased conv for the logits."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        logits: bool = False,
    ):
        super().__init__()
        self.kernel, self.stride, self.logits = kernel, stride, logits
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=logits)
        if not logits:
            self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(same_padding(x, self.kernel, self.stride))
        return x if self.logits else F.relu(self.bn(x))


class InceptionModule(nn.Module):
    def __init__(self, in_channels: int, channels: tuple[int, ...]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3 = channels
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, c0)})
        self.Branch_1 = nn.ModuleDict(
            {"Conv3d_0a_1x1": Unit3D(in_channels, c1a), "Conv3d_0b_3x3": Unit3D(c1a, c1b, (3, 3, 3))}
        )
        self.Branch_2 = nn.ModuleDict(
            {"Conv3d_0a_1x1": Unit3D(in_channels, c2a), "Conv3d_0b_3x3": Unit3D(c2a, c2b, (3, 3, 3))}
        )
        self.Branch_3 = nn.ModuleDict({"Conv3d_0b_1x1": Unit3D(in_channels, c3)})
        self.out_channels = c0 + c1b + c2b + c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0 = self.Branch_0["Conv3d_0a_1x1"](x)
        b1 = self.Branch_1["Conv3d_0b_3x3"](self.Branch_1["Conv3d_0a_1x1"](x))
        b2 = self.Branch_2["Conv3d_0b_3x3"](self.Branch_2["Conv3d_0a_1x1"](x))
        b3 = self.Branch_3["Conv3d_0b_1x1"](max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([b0, b1, b2, b3], dim=1)


class InceptionI3d(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        channels = 192
        for name, spec in INCEPTION_CHANNELS.items():
            self.add_module(name, InceptionModule(channels, spec))
            channels = getattr(self, name).out_channels
        self.Logits = nn.ModuleDict({"Conv3d_0c_1x1": Unit3D(channels, num_classes, logits=True)})

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> Mixed_5c averaged over the final 2x7x7 window, [B, 1024, T', H', W']."""
        x = self.Conv3d_1a_7x7(video)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        for name in INCEPTION_CHANNELS:
            if name == "Mixed_4b":
                x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
            elif name == "Mixed_5b":
                x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
            x = getattr(self, name)(x)
        return F.avg_pool3d(x.float(), (2, 7, 7), stride=1).to(x.dtype)  # CPU has no bf16 avg_pool3d

    def forward(self, video: torch.Tensor, return_pool: bool = False):
        """Pre-softmax Kinetics-400 logits [B, 400] (and the 1024-d pooled features when asked)."""
        pooled = self.features(video)
        logits = self.Logits["Conv3d_0c_1x1"](pooled)
        if logits.shape[-2:] != (1, 1):
            raise ValueError(
                f"I3D needs 224x224 input (got {tuple(video.shape[-2:])}): the logits are not spatially 1x1"
            )
        logits = logits.flatten(2).mean(-1)
        if return_pool:
            return logits, pooled.flatten(2).mean(-1)
        return logits


def load_i3d(weights: str | Path, device: str | torch.device = "cpu") -> InceptionI3d:
    """An eval-mode I3D from a converted safetensors file (no pickle involved)."""
    from safetensors.torch import load_file

    model = InceptionI3d()
    state = load_file(str(weights), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # num_batches_tracked is training bookkeeping that the converter does not write
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{weights}: not an I3D state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device).eval()

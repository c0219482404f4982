"""Classifier-free guidance (Ho & Salimans, 2022): one formula for every diffusion family.

Training drops the condition of a sample with probability p (it is replaced by the null
condition: the unconditional text, or the null class), so one network learns both the
conditional and the unconditional prediction. Sampling mixes the two:

    guided = uncond + scale * (cond - uncond)

`scale` is diffusers' `guidance_scale`: 1 is the conditional prediction alone, 0 the
unconditional one, larger values push away from the unconditional prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def guided_prediction(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`predict(x, condition)` guided by `scale`, the conditional and unconditional halves run as
    one batch (as diffusers' pipelines do); scale 1 skips the unconditional half."""
    if scale == 1.0:
        return predict(x, cond)
    out_cond, out_uncond = predict(torch.cat([x, x]), torch.cat([cond, uncond])).chunk(2)
    return guide(out_cond, out_uncond, scale)


def drop_condition(
    cond: torch.Tensor, null: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each row of `cond` (batch first) replaced by `null` (one row, broadcast) with probability p."""
    dropped = torch.rand(cond.shape[0], generator=generator, device=cond.device) < p
    mask = dropped.reshape(-1, *([1] * (cond.dim() - 1)))
    return torch.where(mask, null.to(cond.dtype).expand_as(cond), cond)

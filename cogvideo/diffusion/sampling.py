"""DDIM sampling (Song et al., 2021) through diffusers' `DDIMScheduler`.

    x0 = ddim_sample(predict, noise, schedule.ddim(), steps=50)            # eta 0: deterministic
    x0 = ddim_sample(predict, noise, scheduler, steps=50, eta=1.0, generator=g)

`predict(x_t, t)` is the network's output at timestep t (an int), e.g. a guided one built with
`cogvideo.diffusion.guidance.guided_prediction`. The whole loop is diffusers' step; nothing
here integrates by hand.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler


@torch.no_grad()
def ddim_sample(
    predict: Callable[[torch.Tensor, int], torch.Tensor],
    noise: torch.Tensor,
    scheduler: DDIMScheduler,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoise `noise` (x_T) in `steps` DDIM steps; eta > 0 adds the generator's fresh noise."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(predict(x, t), t, x, eta=eta, generator=generator).prev_sample
    return x

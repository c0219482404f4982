"""EDM (Karras et al., 2022): preconditioning with x-prediction, the training loss weight and
noise-level distribution, and the samplers, for any family that denoises in EDM's sigma space.

The network F sees a scaled input and a log noise level and its output is mixed with the input
into the denoised estimate (an x-prediction):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

with c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (sd = sigma_data). These and the Karras
sigma schedule are diffusers' `EDMEulerScheduler` (its "epsilon" prediction type is EDM's F
parametrisation); the first-order step is its `step`. EDM's stochastic second-order sampler
(Algorithm 2: churn, Euler step, Heun correction) is diffusers' `KarrasVeScheduler`
(`add_noise_to_input`, `step`, `step_correct`) driven by the same Karras sigmas; diffusers
deprecated that class and no longer exports it at the top level, so it is imported from its
module. Training draws ln(sigma) ~ N(p_mean, p_std^2) and weighs the squared error by
(sigma^2 + sd^2) / (sigma sd)^2 (EDM's Table 1; diffusers has no training helper for them).

`prediction="sample"` is x-prediction proper: the network's output is the denoised estimate
itself, D = F(c_in x; c_noise) (c_skip = 0, c_out = 1; diffusers' `prediction_type="sample"`),
with the same c_in, c_noise and loss weight. With EDM's mix, F's target at small sigma is the
noise itself ((x0 - c_skip x) / c_out -> -n), which a pixel-space transformer whose tokens are
barely wider than their pixels learns slowly; predicting x0 it need not carry the noise through.
EDM's weight then grows as 1 / sigma^2 where no network beats copying its input, so it is taken
at max(sigma, weight_sigma_min) (as "Back to Basics: Let Denoising Generative Models Denoise",
Li and He 2025, clip their x-prediction's weight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import EDMEulerScheduler
from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler

# (noisy x, sigma [batch]) -> the denoised estimate D(x; sigma)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


PREDICTIONS = ("edm", "sample")


@dataclass(frozen=True)
class EDMConfig:
    sigma_data: float = 0.5
    p_mean: float = -1.2  # training: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    sigma_min: float = 0.002  # sampling schedule (Karras rho schedule down to sigma_min, then 0)
    sigma_max: float = 80.0
    rho: float = 7.0
    # what the network predicts: "edm" (EDM's F, D = c_skip x + c_out F) or "sample" (D = F)
    prediction: str = "edm"
    weight_sigma_min: float = 0.0  # the loss weight's sigma floor: lambda(max(sigma, this))

    def problems(self) -> list[str]:
        found = []
        if self.prediction not in PREDICTIONS:
            found.append(f"prediction: {self.prediction!r}, one of {list(PREDICTIONS)}")
        if not 0 < self.sigma_min < self.sigma_max or self.sigma_data <= 0 or self.weight_sigma_min < 0:
            found.append("sigma_min < sigma_max, sigma_data > 0 and weight_sigma_min >= 0 are required")
        return found

    def scheduler(self) -> EDMEulerScheduler:
        return EDMEulerScheduler(
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            sigma_data=self.sigma_data,
            sigma_schedule="karras",
            prediction_type="epsilon",  # diffusers' name for EDM's F parametrisation
            rho=self.rho,
            final_sigmas_type="zero",
        )


class Preconditioner:
    """EDM's c_in, c_noise and the D(x; sigma) mix, from diffusers' EDMEulerScheduler; sigma is a
    tensor broadcastable against x (one per sample: shape [B, 1, ...])."""

    def __init__(self, edm: EDMConfig):
        self.scheduler = edm.scheduler()
        self.predicts_sample = edm.prediction == "sample"

    def c_in(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.scheduler.precondition_inputs(x, sigma)

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.scheduler.precondition_noise(sigma)

    def denoised(self, x: torch.Tensor, network_out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.predicts_sample:
            return network_out.to(x.dtype)
        return self.scheduler.precondition_outputs(x, network_out, sigma)


def sample_sigmas(edm: EDMConfig, shape: tuple[int, ...], generator: torch.Generator | None = None):
    """Training noise levels: ln(sigma) ~ N(p_mean, p_std^2), drawn from `generator`."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * edm.p_std + edm.p_mean).exp()


def loss_weight(edm: EDMConfig, sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (unit effective weight for EDM's F target),
    sigma taken at least weight_sigma_min."""
    sigma = sigma.clamp(min=edm.weight_sigma_min)
    return (sigma**2 + edm.sigma_data**2) / (sigma * edm.sigma_data) ** 2


def karras_sigmas(edm: EDMConfig, steps: int) -> torch.Tensor:
    """The `steps` Karras noise levels from sigma_max to sigma_min, then 0 (steps + 1 values)."""
    scheduler = edm.scheduler()
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.to(torch.float64)


@dataclass(frozen=True)
class Churn:
    """EDM's stochasticity (Algorithm 2): gamma = min(s_churn / steps, sqrt(2) - 1) for sigmas in
    [s_tmin, s_tmax], fresh noise scaled by s_noise. Defaults: EDM's ImageNet-64 settings."""

    s_churn: float = 40.0
    s_tmin: float = 0.05
    s_tmax: float = 50.0
    s_noise: float = 1.003


def sample_heun(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    churn: Churn | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """EDM's Algorithm 2 (stochastic with churn, deterministic Heun with churn=None) from x at
    sigmas[0] through `sigmas` (ending at 0), by diffusers' KarrasVeScheduler steps."""
    churn = churn or Churn(s_churn=0.0)
    steps = len(sigmas) - 1
    scheduler = KarrasVeScheduler(
        sigma_min=float(sigmas[-2]),
        sigma_max=float(sigmas[0]),
        s_noise=churn.s_noise,
        s_churn=churn.s_churn,
        s_min=churn.s_tmin,
        s_max=churn.s_tmax,
    )
    scheduler.set_timesteps(steps)  # sets the step count gamma divides by; its own sigmas are unused
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x_hat, sigma_hat = scheduler.add_noise_to_input(x, sigma, generator)
        x_hat = x_hat.to(x.dtype)
        slope = _score_direction(denoise, x_hat, sigma_hat)
        x_next, derivative = scheduler.step(slope, sigma_hat, sigma_next, x_hat, return_dict=False)
        if sigma_next > 0:  # the Heun correction (not on the last step, to sigma = 0)
            slope_next = _score_direction(denoise, x_next, sigma_next)
            x_next, _ = scheduler.step_correct(
                slope_next, sigma_hat, sigma_next, x_hat, x_next, derivative, return_dict=False
            )
        x = x_next
        if on_step is not None:
            on_step(i + 1, steps)
    return x


def sample_euler(
    denoise: Denoiser,
    x: torch.Tensor,
    edm: EDMConfig,
    steps: int,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Deterministic first-order EDM sampling (Euler) over `steps` Karras sigmas, by diffusers'
    EDMEulerScheduler; `x` starts at sigma_max."""
    scheduler = edm.scheduler()
    scheduler.set_timesteps(steps)
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        scheduler.is_scale_input_called = True  # the denoiser applies c_in itself
        denoised = denoise(x, _per_sample(sigma, x))
        x = scheduler.step(denoised, timestep, x, pred_original_sample=denoised, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, steps)
    return x


def _score_direction(denoise: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """KarrasVeScheduler's model output: (D(x; sigma) - x) / sigma, so that its x0 is D."""
    return (denoise(x, _per_sample(sigma, x)) - x) / sigma


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma), dtype=torch.float64)

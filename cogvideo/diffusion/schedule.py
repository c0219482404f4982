"""A noise schedule as a config section, and diffusers' schedulers built from it.

One `NoiseSchedule` gives the betas of training (`ddpm()`: `add_noise`, the forward process
q(x_t | x_0)) and of sampling (`ddim()`), so the two cannot disagree. The defaults are Latent
Diffusion's (Stable Diffusion's): 1000 steps, betas "scaled_linear" from 0.00085 to 0.012
(LDM's `linear_start` / `linear_end`), epsilon prediction, and LDM's DDIM timesteps (every
T/steps-th step from 1, the last step's previous alpha that of step 0).

`zero_terminal_snr` (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed"; diffusers' `rescale_betas_zero_snr`) rescales the betas so that the last training step
is pure noise, and `timestep_spacing: trailing` makes sampling start from that step. LDM's
schedule keeps sqrt(abar) = 0.07 of the signal at t = T-1 (0.10 at the first of 15 leading DDIM
steps): a network trained on it reads the coarse layout (where an object is) off the noise, and
at sampling the noise, not the condition, decides it. Zero terminal SNR needs a prediction that
defines x0 at pure noise (v_prediction or sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing")


@dataclass(frozen=True)
class NoiseSchedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    zero_terminal_snr: bool = False  # diffusers' rescale_betas_zero_snr
    timestep_spacing: Literal["leading", "trailing"] = "leading"  # DDIM's sampling timesteps

    def validate(self, where: str = "schedule") -> "NoiseSchedule":
        if self.num_train_timesteps < 2:
            raise ValueError(f"{where}.num_train_timesteps: needs >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"{where}.beta_start, beta_end: need 0 < start < end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"{where}.beta_schedule: {self.beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"{where}.prediction_type: {self.prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"{where}.timestep_spacing: {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}"
            )
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError(
                f"{where}.zero_terminal_snr: needs prediction_type v_prediction or sample (epsilon cannot "
                "give x0 from pure noise)"
            )
        return self

    def _common(self) -> dict:
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            clip_sample=False,  # latents are not bounded to [-1, 1]
            rescale_betas_zero_snr=self.zero_terminal_snr,
        )

    def ddpm(self) -> DDPMScheduler:
        return DDPMScheduler(**self._common())

    def ddim(self) -> DDIMScheduler:
        return DDIMScheduler(
            **self._common(), set_alpha_to_one=False, steps_offset=1, timestep_spacing=self.timestep_spacing
        )

    def alphas_cumprod(self) -> torch.Tensor:
        """The cumulative products of (1 - beta_t), float32, one per training timestep."""
        return self.ddpm().alphas_cumprod

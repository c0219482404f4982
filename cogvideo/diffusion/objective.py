"""The DDPM training objective (Ho et al., 2020) on a `NoiseSchedule`.

    objective = objective_for(schedule)             # DiffusionObjective(schedule), built once
    t, noise = objective.draw(x0)                   # t ~ U{0..T-1}, noise ~ N(0, I)
    x_t = objective.noisy(x0, noise, t)             # sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    out = model(x_t, t, ...)
    loss = objective.loss(out, objective.target(x0, noise, t))   # per sample: mean squared error
    x0_hat = objective.predicted_x0(x_t, out, t)    # one-step estimate of x0 from the output

Draws use torch's default generator (or the one given), so a trainer that saves its RNG
states resumes them exactly. The noising and the v target are diffusers' (`add_noise`,
`get_velocity`); the one-step estimate inverts the same forward process.
"""

from __future__ import annotations

import functools

import torch

from cogvideo.diffusion.schedule import NoiseSchedule


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class DiffusionObjective:
    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule.validate()
        self.alphas_cumprod = schedule.alphas_cumprod().double()
        self._schedulers: dict[torch.device, object] = {}

    def scheduler(self, device: torch.device):
        """diffusers' DDPMScheduler, one per device (its add_noise moves its tables to the input's device)."""
        if device not in self._schedulers:
            self._schedulers[device] = self.schedule.ddpm()
        return self._schedulers[device]

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        """A timestep per sample (uniform) and standard normal noise shaped like `x0`."""
        device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
        return t.to(x0.device), noise.to(x0.device, x0.dtype)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler(x0.device).add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x0
        return self.scheduler(x0.device).get_velocity(x0, noise, t)

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error per sample (the L2 objective, LDM's `loss_simple`), in float32."""
        return (output.float() - target.float()).pow(2).flatten(1).mean(1)

    def predicted_x0(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from one network output at step t: for epsilon (x_t - sqrt(1 - abar) eps) / sqrt(abar),
        for v sqrt(abar) x_t - sqrt(1 - abar) v, for sample the output itself."""
        kind = self.schedule.prediction_type
        if kind == "sample":
            return output
        abar = _per_sample(self.alphas_cumprod.to(t.device)[t], x_t)
        if kind == "epsilon":
            return (x_t - (1 - abar).sqrt() * output) / abar.sqrt()
        return abar.sqrt() * x_t - (1 - abar).sqrt() * output


@functools.lru_cache(maxsize=8)
def objective_for(schedule: NoiseSchedule) -> DiffusionObjective:
    """The objective of a (frozen, hashable) schedule, built once per process."""
    return DiffusionObjective(schedule)

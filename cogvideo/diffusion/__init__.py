"""The diffusion core shared by the diffusion families (GLOBER, HPDM): noise schedules, losses,
samplers (taken from diffusers, not hand-written) and classifier-free guidance.

- `schedule`: `NoiseSchedule`, a config section naming a diffusers noise schedule, and the
  DDPM / DDIM schedulers built from it (one set of betas for training and sampling);
- `objective`: the DDPM training objective on that schedule (timestep and noise draws, the
  noised input, the regression target by prediction type, the loss, the one-step x0 estimate);
- `sampling`: DDIM sampling through diffusers' `DDIMScheduler`;
- `guidance`: classifier-free guidance (the formula, both halves in one batch, condition dropout);
- `edm`: EDM preconditioning, loss weights and sampler (the HPDM family's).
"""

"""GLOBER's sampling (paper Sec. 3.2 and 4.1): the DiT draws a global feature from the caption
(DDIM, classifier-free guidance against the guidance text), then the video decoder renders every
requested frame index from that one feature in parallel (DDIM, guidance against the zero global
feature), and the KL-VAE turns the latents into pixels.

    sampler = GloberSampler(model, GloberSampling(global_guidance=9.0, frame_guidance=6.0))
    v = sampler.global_features(text, uncond_text, noise)          # [B, C'', G, G]
    latents = sampler.frames(v, frame_indices(16), frame_noise)     # [B, F, C', L, L]
    video = sampler.pixels(latents)                                 # [B, F, 3, H, W] in [-1, 1]

Frames are decoded `frame_batch` at a time; each depends only on (v, its index, its noise), so
any subset of indices decodes to those frames of a full decode given the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cogvideo.diffusion.guidance import guided_prediction
from cogvideo.diffusion.sampling import ddim_sample
from cogvideo.models.glober.vae import decode_latents


@dataclass
class GloberSampling:
    global_steps: int = 50  # DDIM steps of the DiT (the paper's 50)
    global_guidance: float = 9.0  # the paper's 9.0
    frame_steps: int = 50  # DDIM steps of the video decoder (the paper's 50)
    frame_guidance: float = 6.0  # the paper's: 6.0 on UCF-101, 3.0 on Sky Time-lapse and TaiChi-HD
    eta: float = 0.0  # DDIM's eta (0: deterministic given the noise)
    frame_batch: int = 32  # frames decoded at once (the paper decodes 128 frames 32 at a time)

    def validate(self) -> "GloberSampling":
        for key in ("global_steps", "frame_steps", "frame_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        return self


def frame_indices(num_frames: int) -> torch.Tensor:
    """Normalised indices of `num_frames` frames spanning the clip: i / (F - 1)."""
    return torch.linspace(0.0, 1.0, num_frames) if num_frames > 1 else torch.zeros(1)


class GloberSampler:
    def __init__(self, model, options: GloberSampling | None = None):
        self.model = model
        self.cfg = model.cfg
        self.options = (options or GloberSampling()).validate()

    def _steps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)

    @torch.no_grad()
    def global_features(
        self, text: torch.Tensor, uncond_text: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Caption ids [B, text_length] (and the guidance text's) -> global features from `noise`."""
        dit, o = self.model.dit, self.options

        def predict(x, t):
            return guided_prediction(
                lambda xx, cond: dit(xx, self._steps(xx, t), cond), x, text, uncond_text, o.global_guidance
            )

        return ddim_sample(predict, noise, self.cfg.schedule.ddim(), o.global_steps, o.eta)

    @torch.no_grad()
    def frames(
        self, global_feature: torch.Tensor, indices: torch.Tensor, noise: torch.Tensor, generator=None
    ) -> torch.Tensor:
        """Global features [B, C'', G, G], normalised indices [F] and noise [B, F, C', L, L] ->
        the frames' latents [B, F, C', L, L]."""
        b, f = noise.shape[:2]
        rows = global_feature.repeat_interleave(f, dim=0)
        index = indices.to(noise.device, torch.float32).repeat(b)
        flat = noise.flatten(0, 1)
        chunks = [
            self._decode(
                rows[s : s + self.options.frame_batch],
                index[s : s + self.options.frame_batch],
                flat[s : s + self.options.frame_batch],
                generator,
            )
            for s in range(0, b * f, self.options.frame_batch)
        ]
        return torch.cat(chunks).unflatten(0, (b, f))

    def _decode(self, rows, index, noise, generator) -> torch.Tensor:
        decoder, o = self.model.autoencoder.decoder, self.options

        def predict(x, t):
            def run(xx, cond):
                return decoder(xx, self._steps(xx, t), cond, index.repeat(xx.shape[0] // index.shape[0]))

            return guided_prediction(run, x, rows, torch.zeros_like(rows), o.frame_guidance)

        return ddim_sample(predict, noise, self.cfg.schedule.ddim(), o.frame_steps, o.eta, generator)

    @torch.no_grad()
    def pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, F, C', L, L] -> frames [B, F, 3, H, W] clamped to [-1, 1]."""
        vae = self.model.autoencoder.vae
        frames = [
            decode_latents(vae, chunk) for chunk in latents.flatten(0, 1).split(self.options.frame_batch)
        ]
        return torch.cat(frames).clamp(-1, 1).unflatten(0, latents.shape[:2])

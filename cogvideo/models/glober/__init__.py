"""GLOBER (Sun et al., 2023, "Coherent Non-autoregressive Video Generation via GLOBAL Guided
Video DecodER") as a model family: a video auto-encoder (video encoder -> 2D global feature,
diffusion video decoder rendering any frame from it and its normalised index, trained with the
CRA adversarial loss) and a DiT generating global features from captions.

config (presets) -> model (plain, TP plan, init) -> batch (latent shard sample -> tensors)
-> losses (+ cra) -> sampler -> family (registration, FLOPs, planner model)
"""

from cogvideo.models.glober.family import FAMILY

__all__ = ["FAMILY"]

"""Every option of a sampling run, as one dataclass (YAML + dotted overrides via
`cogvideo.configio`). The run's JSON record is `to_dict(options)`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cogvideo.sampling.strategies import StrategyOptions


def _published_strategy() -> StrategyOptions:
    # CogVideo samples with CogLM's cluster strategy (T=1.05, 12 clusters, T2=0.89); that needs
    # a cluster table, so the default is the plain top-k form of the same temperature and k.
    return StrategyOptions(kind="topk", temperature=1.05, top_k=12)


@dataclass
class SampleOptions:
    stage1_checkpoint: str = ""  # stage-1 model (also generates frame 0 with the temporal channel off)
    # a one-frame (CogView2) model for frame 0 instead: needed when stage 1 trained its backbone too
    frame0_checkpoint: str | None = None
    stage2_checkpoint: str | None = None  # stage-2 model; None stops at the keyframes
    text_tokenizer: str = ""
    image_tokenizer: str = ""
    seed: int = 1234
    batch_size: int = 1  # prompts sampled together
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"  # "cuda" puts each process (or Ray actor) on its local GPU
    tensor_parallel: int = 1
    workers: int = 1  # Ray actors (each loads the models once)

    duration: float = 4.0  # seconds the keyframes span (stage-1 prefix "4.0秒<n>"; stage 2 uses each window's span)
    interpolation_levels: int = 3  # stage-2 levels: 5 -> 9 -> 17 -> 33 frames
    frame0_suffix: str = " 高清摄影"  # frame 0: prompt + suffix, no duration prefix
    video_suffix: str = " 视频"  # stages 1 and 2: duration prefix + prompt + suffix
    uncond_text: str = "视频"  # the unconditional prompt of classifier-free guidance
    frame0_text_bias: float = 1.4  # added to attention scores of frame queries on text keys
    stage1_text_bias: float = 0.0
    stage2_text_bias: float = 0.0
    stage1_guidance: float = 3.0  # lu + s * (lc - lu); 1 = conditional only, 0 = unconditional only
    stage2_guidance: float = 1.0

    frame0_strategy: StrategyOptions = field(default_factory=_published_strategy)
    stage1_strategy: StrategyOptions = field(default_factory=_published_strategy)
    stage2_strategy: StrategyOptions = field(default_factory=_published_strategy)

    fps: float = 0.0  # output frame rate; 0 = the real rate of the final level

    def __post_init__(self):
        if self.batch_size < 1 or self.workers < 1 or self.tensor_parallel < 1:
            raise ValueError("sampling: batch_size, workers and tensor_parallel must be >= 1")
        if self.duration <= 0 or self.interpolation_levels < 0:
            raise ValueError("sampling: duration must be > 0 and interpolation_levels >= 0")

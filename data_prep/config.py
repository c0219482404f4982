"""What a data-preparation job does, as one dataclass filled from YAML and dotted overrides.

Frame size, tokens per frame side and frames per sample are not settings here: they come
from the model config (the `model:` section, `{family, preset, ...field overrides}` as in
training), so shards always fit the model; the model's family picks what the shards hold
(data_prep.encoders). For token shards `model.preset` defaults to the preset the image tokenizer
was fitted for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cogvideo.configio import ConfigError
from cogvideo.family import resolve_model_section
from cogvideo.text_format import RELEASE_FRAME_RATES
from cogvideo.video_io import VIDEO_SUFFIXES


@dataclass
class PrepConfig:
    # {preset, ...ModelConfig field overrides}; no preset: the one the image tokenizer was fitted for
    model: dict = field(default_factory=dict)
    tokenizer: str = ""  # image tokenizer path, as load_image_tokenizer takes it
    # "module:function" called as fn(path, device=...) -> ImageTokenizer, once per encoding process
    tokenizer_loader: str = "cogvideo.tokenizers.loading:load_image_tokenizer"
    # the encoder actors (the image tokenizer, or the family's encoder, e.g. an autoencoder), each
    # loading it once; 0: none, each extraction task encodes its own samples (the encoder loaded
    # once per worker process): no process to start, no frames moved between processes, right for
    # a light encoder on the CPU; None: one actor where the encoder has a GPU or reserved CPUs
    # (tokenizer_gpus, tokenizer_cpus), else none
    tokenizer_actors: int | None = None
    # GPUs per tokenizer actor (> 0 encodes on "cuda"); None: one when the Ray cluster has GPUs
    tokenizer_gpus: float | None = None
    # CPUs Ray reserves per actor: for a heavy tokenizer encoding on the CPU (icetk); 0 lets
    # decoding use every core (a light tokenizer encodes in the extraction tasks, one on a GPU
    # shares the cores)
    tokenizer_cpus: float = 0.0
    tokenize_batch: int = 16  # samples per actor call

    # CogVideo's frame-rate rule: stage 1 takes the lowest rate that still fits all frames in the
    # clip (so the sample spans as much of the action as possible); stage 2 every rate that fits.
    stages: list[int] = field(default_factory=lambda: [1, 2])
    stage1_fps: list[float] = field(default_factory=lambda: list(RELEASE_FRAME_RATES))
    stage2_fps: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])

    # clips: scene cuts (PySceneDetect's ContentDetector), then min / max length
    scene_threshold: float = 27.0
    min_scene_s: float = 0.5  # no two cuts closer than this
    min_clip_s: float = 0.5
    max_clip_s: float = 60.0  # longer scenes are split

    # inputs
    extensions: list[str] = field(default_factory=lambda: list(VIDEO_SUFFIXES))
    min_side: int = 16  # pixels; smaller videos are rejected
    max_side: int = 4096  # larger videos (8K) are rejected
    # a frame interval further than this fraction from the mean interval makes a clip variable-rate
    # (recorded; it then serves rates up to that of its longest interval)
    vfr_tolerance: float = 0.25

    # output
    shard_samples: int = 1000  # a shard is closed at this many samples ...
    shard_bytes: int = 256 * 2**20  # ... or this many bytes, whichever comes first
    num_cpus: int = 0  # local Ray: 0 means every core
    # videos per Ray task; 0: sized by the job (data_prep.pipeline.task_count) on the CPUs the
    # cluster has when it starts (a cluster that scales up later: set it); a task costs Ray tens
    # of ms, more than a short video's own decoding
    inputs_per_task: int = 0

    def __post_init__(self):
        def bad(key: str, why: str):
            raise ConfigError(f"prep.{key}: {why}")

        if not set(self.stages) <= {1, 2} or not self.stages:
            bad("stages", f"expected a non-empty subset of [1, 2], got {self.stages}")
        for key in ("stage1_fps", "stage2_fps"):
            rates = getattr(self, key)
            if not rates or min(rates) <= 0:
                bad(key, f"expected positive frame rates, got {rates}")
        if not 0 < self.min_clip_s <= self.max_clip_s:
            bad(
                "min_clip_s",
                f"expected 0 < min_clip_s <= max_clip_s={self.max_clip_s}, got {self.min_clip_s}",
            )
        if not 0 < self.min_side <= self.max_side:
            bad("min_side", f"expected 0 < min_side <= max_side={self.max_side}, got {self.min_side}")
        for key in ("shard_samples", "shard_bytes", "tokenize_batch"):
            if getattr(self, key) <= 0:
                bad(key, f"must be positive, got {getattr(self, key)}")
        if self.tokenizer_actors is not None and self.tokenizer_actors < 0:
            bad(
                "tokenizer_actors",
                f"must be >= 0 (0: encode in the extraction tasks), got {self.tokenizer_actors}",
            )
        if self.tokenizer_actors == 0 and (self.tokenizer_cpus > 0 or (self.tokenizer_gpus or 0) > 0):
            bad(
                "tokenizer_actors",
                "0 encodes in the extraction tasks, on their CPU: tokenizer_cpus and tokenizer_gpus are "
                "for actors; set tokenizer_actors >= 1, or leave those at 0",
            )
        if self.inputs_per_task < 0:
            bad(
                "inputs_per_task",
                f"must be positive, or 0 to let the job size its tasks, got {self.inputs_per_task}",
            )
        if ":" not in self.tokenizer_loader:
            bad("tokenizer_loader", f"expected module:function, got {self.tokenizer_loader!r}")

    def gpus_per_actor(self, cluster_gpus: float) -> float:
        if self.tokenizer_actors == 0:
            return 0.0
        if self.tokenizer_gpus is None:
            return 1.0 if cluster_gpus >= 1 else 0.0
        return self.tokenizer_gpus

    def encoder_actors(self, gpus_per_actor: float) -> int:
        """How many encoder actors the job starts (0: the extraction tasks encode)."""
        if self.tokenizer_actors is not None:
            return self.tokenizer_actors
        return 1 if gpus_per_actor > 0 or self.tokenizer_cpus > 0 else 0


def prep_model(cfg: PrepConfig):
    """The model the shards are for (`prep.model`, resolved by its family): its frame size, frames
    per sample and the family's encoder decide what the shards hold."""
    if cfg.model.get("preset") is None:
        raise ConfigError(
            "prep.model.preset: required: set model.preset=NAME (cogvideo-params lists them); token shards "
            "take it from an image tokenizer, which records its preset (a file written before tokenizer files "
            "recorded theirs does not: pass model.preset=NAME, or fit it again with "
            "cogvideo-fit-image-tokenizer preset=NAME)"
        )
    try:
        model = resolve_model_section(cfg.model)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if model.num_frames == 1 and 2 in cfg.stages:
        raise ConfigError("prep.stages: a one-frame model (e.g. a backbone preset) has no stage-2 samples")
    return model

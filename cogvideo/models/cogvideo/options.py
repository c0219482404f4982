"""Every option of a sampling run, as one dataclass (YAML + dotted overrides via
`cogvideo.configio`). The run's JSON record is `to_dict(options)`.

The defaults are the release's recipe (THUDM/CogVideo `cogvideo_pipeline.py` with
`scripts/inference_cogvideo_pipeline.sh`): frame 0 by CogLM's cluster strategy (T=1.0, 16
clusters) with text attention bias 1.4 and the suffix " 高清摄影"; stage 1 guided (3.0) with
" 视频" and the cluster strategy (T=1.05, 12 clusters, T2=0.89); stage 2 unguided with the bare
prompt and text attention bias 1.4; with `sr_checkpoint`, CogView2's direct super-resolution of
every frame (cluster strategy T=1.0, 6 clusters, T2=0.6; 12 frames at a time). The text format (duration prefix, guidance text) is not an
option: each stage reads the one its checkpoint was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cogvideo.precision import AttentionPrecision, Precision
from cogvideo.sampling.options import path_problems
from cogvideo.sampling.strategies import StrategyOptions
from cogvideo.text_format import FRAME0_SUFFIX, VIDEO_SUFFIX

UNGUIDED_TEXT_BIAS = 1.4  # the release's text attention bias of an unguided pass (0 when guided)


def _frame0_strategy() -> StrategyOptions:
    return StrategyOptions(kind="cluster", temperature=1.0, top_k=16, temperature2=0.89)


def _sr_strategy() -> StrategyOptions:
    """The release's DSR step (`IterativeEntfilterStrategy`): T 1.0, top 6 clusters, then T2 0.6."""
    return StrategyOptions(kind="cluster", temperature=1.0, top_k=6, temperature2=0.6)


def _video_strategy() -> StrategyOptions:
    return StrategyOptions(kind="cluster", temperature=1.05, top_k=12, temperature2=0.89)


@dataclass
class SampleOptions:
    stage1_checkpoint: str = ""  # stage-1 model (also generates frame 0 with the temporal channel off)
    # a one-frame (CogView2) model for frame 0 instead: needed when stage 1 trained its backbone too
    frame0_checkpoint: str | None = None
    stage2_checkpoint: str | None = None  # stage-2 model; without it set interpolation_levels=0
    # CogView2's direct super-resolution (model family dsr, e.g. 20 x 20 -> 60 x 60 codes, 160 ->
    # 480 px): every frame of the video, after the last stage; the outputs are then high-res
    sr_checkpoint: str | None = None
    text_tokenizer: str = ""
    image_tokenizer: str = ""
    # codebook clusters of the cluster strategy: the release's cluster_label2.npy / cluster_label.npy
    # (20000 codes), or the .npz of `cogvideo-clusters --image-tokenizer ...` for your own tokenizer
    cluster_table: str | None = None
    seed: int = 1234
    batch_size: int = 1  # prompts sampled together
    dtype: Precision = "auto"  # auto: bf16 where the device runs it fast (cogvideo.precision)
    # what a bf16/fp16 run's attention computes in: auto times the decoding both ways on a CPU and
    # keeps the faster, as training's parallel.attention_precision (cogvideo.sdpa); fp32 / same
    attention_precision: AttentionPrecision = "auto"
    device: str = "cpu"  # "cuda" puts each process (or Ray actor) on its local GPU
    tensor_parallel: int = 1
    workers: int = 1  # Ray actors (each loads the models once)

    duration: float = (
        4.0  # seconds the keyframes span (stage 1's duration prefix; stage 2 uses each window's)
    )
    interpolation_levels: int = 3  # stage-2 levels: 5 -> 9 -> 17 -> 33 frames
    frame0_suffix: str = FRAME0_SUFFIX  # frame 0: prompt + suffix, no duration prefix
    # frame 0's text carries the duration prefix too, in the frame-0 model's trained format (its
    # checkpoint's, which must have a {duration} field); the release's frame-0 pass has none
    frame0_duration_prefix: bool = False
    video_suffix: str = VIDEO_SUFFIX  # stage 1 when guided: prompt + suffix (stage 2: the prompt alone)
    # a suffix that would take a prompt over the model's text budget: "drop" it for that prompt
    # (said on the console and in its record.json) or "error" (the prompt fails)
    suffix_over_budget: Literal["drop", "error"] = "drop"
    frame0_text_bias: float = UNGUIDED_TEXT_BIAS  # added to attention scores of frame queries on text keys
    stage1_text_bias: float | None = None  # None: the release's rule, 1.4 unguided, 0 guided
    stage2_text_bias: float | None = None
    stage1_guidance: float = 3.0  # lu + s * (lc - lu); 1 = conditional only (unguided)
    stage2_guidance: float = 1.0

    frame0_strategy: StrategyOptions = field(default_factory=_frame0_strategy)
    stage1_strategy: StrategyOptions = field(default_factory=_video_strategy)
    stage2_strategy: StrategyOptions = field(default_factory=_video_strategy)
    sr_strategy: StrategyOptions = field(default_factory=_sr_strategy)
    sr_frames_per_batch: int = 12  # frames super-resolved together (the release: 12)
    # the text every frame's super-resolution reads: "prompt", the raw prompt (the release's), or
    # "uncond", the SR checkpoint's guidance caption (its text format's uncond_text, e.g. "视频"),
    # so that SR follows the low-res frame alone; for a model trained with data.caption_dropout
    sr_text: Literal["prompt", "uncond"] = "prompt"

    fps: float = 0.0  # output frame rate; 0 = the real rate of the final level

    def __post_init__(self):
        if min(self.batch_size, self.workers, self.tensor_parallel, self.sr_frames_per_batch) < 1:
            raise ValueError(
                "sampling: batch_size, workers, tensor_parallel and sr_frames_per_batch must be >= 1"
            )
        if self.duration <= 0 or self.interpolation_levels < 0:
            raise ValueError("sampling: duration must be > 0 and interpolation_levels >= 0")

    def text_bias(self, stage: Literal["stage1", "stage2"]) -> float:
        bias = getattr(self, f"{stage}_text_bias")
        if bias is not None:
            return bias
        return UNGUIDED_TEXT_BIAS if getattr(self, f"{stage}_guidance") == 1.0 else 0.0

    def problems(self) -> list[str]:
        """Every option a run cannot start with, one line each (no file is opened)."""
        found = path_problems(
            required={
                "stage1_checkpoint": self.stage1_checkpoint,
                "text_tokenizer": self.text_tokenizer,
                "image_tokenizer": self.image_tokenizer,
            },
            optional={
                "frame0_checkpoint": self.frame0_checkpoint,
                "stage2_checkpoint": self.stage2_checkpoint,
                "sr_checkpoint": self.sr_checkpoint,
                "cluster_table": self.cluster_table,
            },
        )
        if self.interpolation_levels and not self.stage2_checkpoint:
            found.append(
                f"interpolation_levels={self.interpolation_levels} needs stage2_checkpoint: give one, "
                f"or set interpolation_levels=0 to stop at the keyframes"
            )
        if self.sr_text != "prompt" and not self.sr_checkpoint:
            found.append(f"sr_text={self.sr_text} needs sr_checkpoint: give one, or leave sr_text=prompt")
        stages = ("frame0", "stage1", "stage2") if self.interpolation_levels else ("frame0", "stage1")
        found += [
            f"{s}_strategy.kind=mean hands out expected pixels, not codes, which the next stage could not "
            f"read: only sr_strategy (the last stage) can use it"
            for s in stages
            if getattr(self, f"{s}_strategy").kind == "mean"
        ]
        stages += ("sr",) if self.sr_checkpoint else ()
        clustered = [s for s in stages if getattr(self, f"{s}_strategy").kind == "cluster"]
        if clustered and not self.cluster_table:
            names = ", ".join(f"{s}_strategy" for s in clustered)
            found.append(
                f"cluster_table: {names} use the release's cluster strategy, which needs the codebook's "
                f"clusters: give cluster_table=cluster_label2.npy (released) or the output of "
                f"`cogvideo-clusters --image-tokenizer ... --out clusters.npz`, or set "
                f"{clustered[0]}_strategy.kind=topk (and the others)"
            )
        return found

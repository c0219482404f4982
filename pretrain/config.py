"""The training configuration: one dataclass per concern, loaded from YAML + dotted overrides.

    cfg = load_train_config("configs/small_stage1.yaml", ["optim.lr=1e-4"])
    model_cfg = check_config(cfg, world_size=8)   # before any process group starts

The `model:` section is a preset name plus any :class:`cogvideo.models.cogvideo.config.ModelConfig` field,
validated by :func:`cogvideo.family.resolve_model_section` (`model.family` picks the family,
cogvideo by default).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

import torch

from cogvideo.configio import ConfigError, load_config
from cogvideo.family import family_of, optimized_parts, resolve_model_section, section_family
from cogvideo.models.cogvideo.config import ModelConfig
from cogvideo.precision import AttentionPrecision, Precision
from cogvideo.text_format import DEFAULT_PREFIX_TEMPLATE, UNCOND_CAPTION, TextFormat


@dataclass
class InitConfig:
    backbone: str | None = None  # a backbone (CogView2) checkpoint; the video parts start as the backbone
    weights: str | None = None  # converted weights of this very model (e.g. a finished stage)
    optimizer: bool = False  # also restore the Adam moments and step saved with init.weights
    # (`cogvideo-convert zero RUN OUT`: resume on another TP x DP layout)


# what ZeRO-0 trains in: pretrain.optim's GuardedAdamW steps fp32 parameters or fp32 masters of
# bf16 ones; fp16's dynamic loss scaling is DeepSpeed's ZeRO optimizers'
ZERO0_PRECISIONS = ("fp32", "bf16")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    # 0: nothing partitioned, each DP rank steps the whole optimizer state (pretrain.optim's
    # GuardedAdamW, fp32 master weights in bf16); fp32 or bf16. auto: 0 where there is nothing to
    # partition (one DP rank, fp32 or bf16, the optimizer not offloaded), else 2 (`resolved_zero_stage`)
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    offload_optimizer: bool = False  # optimizer states and step on the CPU
    # auto: the device's low precision (bf16 on A100/H100 and CPUs, fp16 with loss scaling on
    # V100) where the run's own training step, timed at start-up in both, is clearly faster than
    # fp32's (cogvideo.precision, pretrain/step_probe.py); else fp32. Resolved once per run
    precision: Precision = "auto"
    # what a bf16/fp16 run's attention computes in (cogvideo.sdpa): auto times the step with it
    # in fp32 too, on a CPU (a bf16 kernel's backward is slow on some), fp32, or same as the run
    attention_precision: AttentionPrecision = "auto"
    auto_excludes: list[Literal["bf16", "fp16"]] = field(
        default_factory=list
    )  # precisions auto never chooses for this run: known to cost its quality
    precision_probe: dict = field(default_factory=dict)  # written by the trainer: how precision was chosen
    initial_loss_scale_power: int = (
        16  # fp16: dynamic loss scale starts at 2**this (DeepSpeed's and CogVideo's)
    )
    backend: str | None = None  # None: nccl with GPUs, gloo without


@dataclass
class OptimConfig:
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-4  # not applied to norms, biases and the temporal gates
    grad_clip: float = 1.0  # global norm over all ranks; 0 disables
    # an exponential moving average of the weights (pretrain/ema.py, diffusers' EMAModel schedule),
    # exported by `cogvideo-convert zero` as the model's weights; 0: none
    ema_decay: float = 0.0


@dataclass
class TrainingConfig:
    max_steps: int = 1000  # optimizer steps; the cosine schedule ends here
    micro_batch_size: int = 1  # samples per data-parallel rank per forward
    grad_accum_steps: int = 1
    seed: int = 1234
    max_nonfinite_steps: int = 10  # stop after this many skipped (NaN/Inf) steps in a row


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # tar paths, globs or {a..b} brace ranges
    stage: int | None = None  # keep samples of this stage; None: the model's stage (1 or 2)
    shuffle_buffer: int = 1000  # 0 keeps shard order
    text_tokenizer: str | None = None  # SentencePiece model (cogvideo.tokenizers.text)
    # the text format (cogvideo.text_format.TextFormat); checkpoints record it and the sampler uses it
    prefix_template: str = DEFAULT_PREFIX_TEMPLATE
    caption_dropout: float = (
        0.0  # fraction of samples trained on the guidance text (classifier-free guidance)
    )
    uncond_text: str = UNCOND_CAPTION  # caption of the guidance text
    uncond_prefix: bool = True  # the guidance text keeps the duration prefix (the release's)
    prefetch_batches: int = 4  # batches prepared by a background thread
    max_cut_text: float = 0.05  # fraction of sampled captions model.text_length may cut (checked at start)

    def text_format(self) -> TextFormat:
        return TextFormat(self.prefix_template, self.uncond_text, self.uncond_prefix)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every_steps: int = 1000
    keep_last: int = 3
    resume: str | None = None  # "auto": newest complete checkpoint in dir (if any); or a checkpoint path
    export_full: bool = False  # also write the merged full fp32 state dict (model_full.pt) at each save


@dataclass
class LoggingConfig:
    dir: str | None = None  # None: {checkpoint.dir}/logs
    every_steps: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    peak_flops: float = 312e12  # per device, for MFU (A100 bf16 dense)
    sample_keys: bool = False  # write the sample keys of every batch (samples_rank{r}.jsonl)


@dataclass
class TrainConfig:
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def log_dir(self) -> str:
        return self.logging.dir or os.path.join(self.checkpoint.dir, "logs")


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


def world_size_from_env() -> int:
    """The launcher's world size: torchrun/deepspeed set WORLD_SIZE, srun SLURM_NTASKS."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The `model:` section ({family (default cogvideo), preset, ...fields}) -> the family's config."""
    try:
        return resolve_model_section(cfg.model, cfg.parallel.tensor_parallel)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def trained_model_section(cfg: TrainConfig) -> dict:
    """The `model:` section as the trainer runs it: from scratch (no init.backbone / init.weights)
    every parameter trains unless model.train_backbone says otherwise (families without a frozen
    backbone have no such field: everything trains)."""
    if "train_backbone" in cfg.model or cfg.init.backbone or cfg.init.weights:
        return cfg.model
    if "train_backbone" not in {f.name for f in dataclasses.fields(section_family(cfg.model).config)}:
        return cfg.model
    return {**cfg.model, "train_backbone": True}


def check_config(cfg: TrainConfig, world_size: int, has_gpu: bool | None = None) -> ModelConfig:
    """Every check that needs no process group; returns the resolved model config.

    The model section as trained (:func:`trained_model_section`: from scratch every parameter
    trains) is written into `cfg`, and so into the checkpoint's config."""
    cfg.model = trained_model_section(cfg)
    model_cfg = model_config(cfg)
    has_gpu = torch.cuda.is_available() if has_gpu is None else has_gpu
    if cfg.parallel.precision == "fp16" and not has_gpu:
        raise ConfigError(
            "parallel.precision: fp16 needs GPUs (DeepSpeed's CPU accelerator has no fp16); use bf16 or fp32"
        )
    tp = cfg.parallel.tensor_parallel
    if world_size % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} does not divide the world size {world_size}")
    _check_numbers(cfg)
    _check_data_and_starting_point(cfg, model_cfg)
    return model_cfg


def _check_numbers(cfg: TrainConfig) -> None:
    positive = {
        "training.max_steps": cfg.training.max_steps,
        "training.micro_batch_size": cfg.training.micro_batch_size,
        "training.grad_accum_steps": cfg.training.grad_accum_steps,
        "training.max_nonfinite_steps": cfg.training.max_nonfinite_steps,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "logging.every_steps": cfg.logging.every_steps,
        "logging.peak_flops": cfg.logging.peak_flops,
        "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key, value in {
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
    }.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if not 0 <= cfg.data.max_cut_text <= 1:
        raise ConfigError(f"data.max_cut_text: must be in [0, 1], got {cfg.data.max_cut_text}")
    if not 0 <= cfg.data.caption_dropout < 1:
        raise ConfigError(f"data.caption_dropout: must be in [0, 1), got {cfg.data.caption_dropout}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: each must be in [0, 1), got {cfg.optim.betas}")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay: must be in [0, 1), got {cfg.optim.ema_decay}")
    if cfg.parallel.zero_stage == 0 and cfg.parallel.precision not in ("auto", *ZERO0_PRECISIONS):
        raise ConfigError(
            "parallel.zero_stage: 0 trains in fp32 or bf16; fp16 (dynamic loss scaling) needs ZeRO-1, 2 "
            "or 3 (parallel.zero_stage=2)"
        )
    if cfg.parallel.zero_stage == 0 and cfg.parallel.offload_optimizer:
        raise ConfigError("parallel.offload_optimizer: needs ZeRO (parallel.zero_stage 1, 2 or 3)")
    if cfg.optim.ema_decay and cfg.parallel.zero_stage == 3:
        raise ConfigError(
            "optim.ema_decay: not with parallel.zero_stage=3 (each rank holds a partition of the "
            "weights, the average is kept of whole ones); use ZeRO-1 or 2, or ema_decay=0"
        )


def _check_data_and_starting_point(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    try:
        cfg.data.text_format()
    except ValueError as err:
        raise ConfigError(f"data.{err}") from None
    if not cfg.data.shards:
        raise ConfigError("data.shards: no shards given")
    if cfg.data.stage is None and family_of(model_cfg).default_stage(model_cfg) is None:
        raise ConfigError(
            f"data.stage: required for model {model_cfg.name} (which prepared stage's clips to train on)"
        )
    if cfg.data.stage not in (None, 1, 2):
        raise ConfigError(f"data.stage: must be 1 or 2, got {cfg.data.stage}")
    if cfg.init.backbone and cfg.init.weights:
        raise ConfigError("init.backbone and init.weights: give at most one starting point")
    if cfg.init.backbone and family_of(model_cfg).from_backbone is None:
        raise ConfigError(
            f"init.backbone: model.family={family_of(model_cfg).name} does not start from a backbone; "
            f"use init.weights"
        )
    if cfg.init.optimizer and not cfg.init.weights:
        raise ConfigError(
            "init.optimizer: needs init.weights (a converted checkpoint with an optimizer/ folder)"
        )
    if cfg.init.optimizer and len(optimized_parts(model_cfg)) > 1:
        raise ConfigError(
            f"init.optimizer: model {model_cfg.name} trains {len(optimized_parts(model_cfg))} optimised parts "
            "with an optimizer each; resume their Adam states from the training checkpoint (--resume)"
        )
    if cfg.checkpoint.resume not in (None, "auto") and not os.path.isdir(cfg.checkpoint.resume):
        raise ConfigError(
            f"checkpoint.resume: {cfg.checkpoint.resume!r} is neither 'auto' nor a checkpoint directory"
        )


def check_text_tokenizer(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """The text tokenizer exists and its pieces fit the model's vocabulary (before any rank starts);
    a model that reads no text needs none."""
    from cogvideo.tokenizers.text import check_fits

    if not family_of(model_cfg).reads_text(model_cfg):
        return
    if not cfg.data.text_tokenizer:
        raise ConfigError("data.text_tokenizer: required (a SentencePiece model file or directory)")
    try:
        check_fits(cfg.data.text_tokenizer, model_cfg, "data.text_tokenizer")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def resolved_zero_stage(parallel: ParallelConfig, dp_size: int, precision: str) -> int:
    """parallel.zero_stage as a run of `dp_size` data-parallel ranks training in `precision` takes it."""
    if parallel.zero_stage != "auto":
        return parallel.zero_stage
    nothing_to_partition = dp_size == 1 and not parallel.offload_optimizer
    return 0 if nothing_to_partition and precision in ZERO0_PRECISIONS else 2


def data_stage(data: DataConfig, model_cfg) -> int:
    """The prepared stage whose clips train the model: data.stage, else the family's default."""
    return data.stage if data.stage is not None else family_of(model_cfg).default_stage(model_cfg)

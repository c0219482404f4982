"""A model family's spec and the registry (see cogvideo/family.py for the lookups)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from cogvideo.tp_plan import TPPlan
from cogvideo.vocab import VocabLayout


class TextModelConfig(Protocol):
    """What the machinery shared by every family (text tokenizer checks, the prompt encoder, the
    training-checkpoint reader) reads of a family's model config: its preset name, vocabulary and
    text budget."""

    name: str
    vocab: VocabLayout
    text_length: int


@dataclass(frozen=True)
class MatmulFlops:
    """Forward FLOPs of one group of matrix products, batch 1."""

    name: str
    forward: float
    trainable_weight: bool  # False: frozen weight, or no weight (attention products)
    activation_inputs: int = 1  # inputs that need a gradient: 1 for x @ W, 2 for Q @ K^T, P @ V

    @property
    def backward(self) -> float:
        return self.forward * (self.activation_inputs + self.trainable_weight)


@dataclass(frozen=True)
class PlannerModel:
    """What `cogvideo-plan` needs of a family beyond its model and TP plan (which give the
    parameters on each TP rank): the activations one GPU keeps and the work around the matrix
    products. Sizes are bytes for `batch` sequences on one of `tp` ranks, `dtype` a precision
    name (cogvideo.precision); FLOPs are per sequence."""

    describe: Callable[[Any], str]  # one line: the model's shape, for the report
    # (cfg, batch, tp, dtype, act_ckpt): activations at the start of backward, where they peak
    activation_bytes: Callable[[Any, int, int, str, bool], float]
    layer_activation_bytes: Callable[[Any, int, int, str], float]  # what one layer keeps for backward
    logits_bytes: Callable[[Any, int, int, str], float]  # the output layer's share, freed first
    recompute_flops: Callable[[Any], float]  # activation checkpointing's extra forward (0 without)
    # (cfg, act_ckpt) -> (tensor-parallel all-reduces per step, elements of each per sequence)
    tp_allreduces: Callable[[Any, bool], tuple[int, int]]


@dataclass(frozen=True)
class OptimizedPart:
    """A part of the model trained by its own optimizer (its own DeepSpeed engine), in turns with
    the family's other parts: a GAN's generator and discriminator. Each turn is `steps(cfg)`
    consecutive optimizer steps of this part, on batches of their own; the parts' engines, the
    loader and the RNG states are saved and resumed together (`pretrain/parts.py`)."""

    name: str  # its folder in a checkpoint tag and the suffix of its metrics (loss_<name>)
    module: str  # the submodule it optimises ("" : the whole model)
    # (cfg, every part's engine by name, batch, device) -> this part's loss; the other parts'
    # parameters take no gradient meanwhile
    loss: Callable[[Any, Mapping[str, Any], Any, torch.device], torch.Tensor]
    steps: Callable[[Any], int]


def _no_problem(cfg, sample) -> None:
    return None


def _first_stage(cfg) -> int:
    return 1


def _reads_text(cfg) -> bool:
    return True


@dataclass(frozen=True)
class ModelFamily:
    name: str
    # the model config dataclass: name, validate(tensor_parallel), activation_checkpointing, num_layers
    # (the TP plan's blocks); what the trainer reads of a sample: seq_length (tokens per sample, for
    # throughput), hidden_size and ffn_size (the precision probe's matmul), text_length and vocab
    # (the text tokenizer and caption budget); data preparation reads frame_size and num_frames
    config: type
    presets: Mapping[str, Callable[[], Any]]  # preset name -> config
    # config -> the plain model (full shapes, torch layers, `.cfg`), built on the meta device
    build_model: Callable[[Any], nn.Module]
    # (config, parameter name, its full tensor) -> fills it in place: the initialisation, drawn one
    # whole parameter at a time in the model's order (so TP=n holds TP=1's weights sliced)
    init_weights: Callable[[Any, str, torch.Tensor], None]
    tp_plan: TPPlan
    # (cfg, model or engine, batch, device) -> loss; the batch's tensors are the examples' stacked
    loss: Callable[[Any, Callable, Any, torch.device], torch.Tensor]
    # batch builder: (cfg, shard sample, text ids, seed) -> the sample's training example, a dict of
    # tensors; `seed` is fixed per (run seed, epoch, sample), so an exact resume draws the same
    example: Callable[..., dict[str, torch.Tensor]]
    train_flops: Callable[[Any], float]  # per sample, forward + backward (throughput and MFU)
    # the shard kind the family reads (cogvideo.shards.KINDS) and what data preparation writes for
    # it: the name of an encoder in data_prep's registry (data_prep.encoders.ENCODERS)
    shard_kind: str = "tokens"
    prep_encoder: str = "tokens"
    # (cfg) -> whether the model reads its samples' captions as text; False (e.g. a class-conditional
    # preset): training needs no data.text_tokenizer and checks no caption lengths
    reads_text: Callable[[Any], bool] = _reads_text
    # (cfg, shard sample) -> why the sample does not fit the model (it is skipped and counted), or None
    sample_problem: Callable[[Any, Any], str | None] = _no_problem
    default_stage: Callable[[Any], int | None] = _first_stage  # the prepared stage trained on; None: required
    # (backbone state dict, cfg) -> the model's starting state dict (training's init.backbone), or None
    from_backbone: Callable[[dict, Any], dict] | None = None
    # "module:Class" of the sampling pipeline (`options_class`, `load(options)`; imported on use: no import cycle)
    sampler: str | None = None
    planner: PlannerModel | None = None  # None: cogvideo-plan refuses the family
    # low precisions `auto` never picks for this family (known to cost its quality), in training
    # (beside parallel.auto_excludes) and sampling
    auto_excludes: tuple[str, ...] = ()
    # config -> the separately optimised parts, in turn order; None (or empty): one engine for the
    # whole model, trained by `loss`
    parts: Callable[[Any], tuple[OptimizedPart, ...]] | None = None
    # "module:attribute" of its SwissArmyTransformer checkpoint layout (a `SatLayout` of cogvideo/
    # checkpoint/sat_layout.py, in its package; imported on use): cogvideo-convert import-sat /
    # export-sat. None: it has none
    sat_layout: str | None = None

    def preset(self, name: str):
        if name not in self.presets:
            raise ValueError(
                f"model.preset: unknown preset {name!r} (family {self.name}); known: {sorted(self.presets)}"
            )
        return self.presets[name]().validate()


REGISTRY: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    if family.name in REGISTRY and REGISTRY[family.name] != family:
        raise ValueError(f"model family {family.name!r} is already registered")
    if any(f.config is family.config and f.name != family.name for f in REGISTRY.values()):
        raise ValueError(f"{family.config.__name__} already belongs to another family")
    REGISTRY[family.name] = family
    return family

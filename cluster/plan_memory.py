"""Per-GPU memory of one training layout: model states (the DeepSpeed accounting) and the
activations the model keeps for the backward pass (its family's planner model, e.g.
cogvideo/models/cogvideo/planner.py).

Model states, per parameter on this TP rank, for 16-bit training with Adam (the byte counts
DeepSpeed's ZeRO estimators use; `dp` = data-parallel size)::

                      16-bit weights  16-bit grads  fp32 grads  fp32 master + Adam m, v
    ZeRO-0            2               2             4           12
    ZeRO-1            2               2             4 / dp      12 / dp
    ZeRO-2            2               2 / dp        4 / dp      12 / dp
    ZeRO-3            2 / dp          -             4 / dp      12 / dp   (+ 4 x largest layer gathered)
    + offload         grads and optimizer states move to host memory (ZeRO-3 keeps its 16-bit shard)

Frozen parameters (the CogView2 backbone, ~6B of 7.7B) hold only their weights. fp32 training
keeps no master copy: 4 (weights) + 4 (grads) + 8 (Adam) bytes per trainable parameter.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from cogvideo.family import PlannerModel, family_of, plain_model
from cogvideo.precision import torch_dtype

GiB = 2**30
BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size and allgather_bucket_size (its GPU runs)


@dataclass(frozen=True)
class Layout:
    gpus: int
    gpus_per_node: int = 8
    tp: int = 1
    zero: int = 2
    offload: bool = False  # optimizer states (+ fp32 grads) in host memory
    micro_batch: int = 1
    act_ckpt: bool = False
    dtype: str = "bf16"
    reduce_bucket: float = (
        BUCKET_ELEMENTS  # elements; the trainer's CPU runs: pretrain.optim.CPU_REDUCE_BUCKET
    )

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def dtype_bytes(self) -> int:
        return torch_dtype(self.dtype).itemsize

    def describe(self) -> str:
        nodes = -(-self.gpus // self.gpus_per_node)
        zero = f"ZeRO-{self.zero}" + (" + CPU offload" if self.offload else "")
        ckpt = ", act ckpt" if self.act_ckpt else ""
        return (
            f"{self.gpus} GPUs ({nodes} node{'s' if nodes > 1 else ''} x {self.gpus_per_node}), "
            f"TP {self.tp} x DP {self.dp}, "
            f"{zero}, micro-batch {self.micro_batch}, {self.dtype}{ckpt}"
        )


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one TP rank (before ZeRO partitioning)."""

    trainable: int
    frozen: int
    largest_layer: int  # most parameters owned directly by one module (DeepSpeed's ZeRO-3 rule)
    largest_trainable: int  # the biggest single trainable tensor

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


@functools.lru_cache(maxsize=8)
def _param_table(config: type, cfg_key: tuple) -> tuple[tuple[str, int, int, bool, bool], ...]:
    """(module, numel, copies, trainable, split over TP) of every parameter of the real model.

    Built on the meta device with one of the TP plan's blocks (constructing a 48-layer model's
    modules costs seconds); block parameters repeat `num_layers` times. A family whose blocks
    differ (its config derives num_layers rather than setting it) is built whole."""
    cfg = config(**dict(cfg_key))
    family = family_of(cfg)
    blocks = family.tp_plan.blocks
    alike = blocks is not None and "num_layers" in {f.name for f in dataclasses.fields(cfg) if f.init}
    copies = cfg.num_layers if alike else 1
    model = plain_model(dataclasses.replace(cfg, num_layers=1) if alike else cfg)
    return tuple(
        (
            name.rpartition(".")[0],
            p.numel(),
            copies if alike and name.startswith(blocks + ".") else 1,
            p.requires_grad,
            family.tp_plan.rule(name) is not None,
        )
        for name, p in model.named_parameters()
    )


def rank_params(cfg, tp: int) -> RankParams:
    """Per-rank counts from the model's own parameters and its family's TP plan."""
    key = tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init)
    trainable = frozen = largest_trainable = 0
    per_module: dict[str, int] = {}
    for module, numel, copies, trains, split in _param_table(type(cfg), key):
        local = numel // tp if split else numel
        if trains:
            trainable += local * copies
            largest_trainable = max(largest_trainable, local)
        else:
            frozen += local * copies
        per_module[module] = per_module.get(module, 0) + local
    return RankParams(trainable, frozen, max(per_module.values()), largest_trainable)


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU (and per GPU in host memory when offloading)."""

    weights_trainable: float
    weights_frozen: float
    gradients: float
    optimizer: float
    gathered_layer: float  # ZeRO-3: one layer's full weights (+ grads) while it runs
    host: float  # offloaded grads + optimizer states, per GPU

    @property
    def gpu_total(self) -> float:
        return (
            self.weights_trainable
            + self.weights_frozen
            + self.gradients
            + self.optimizer
            + self.gathered_layer
        )


def model_states(params: RankParams, layout: Layout) -> ModelStates:
    zero, dp, train, frozen = layout.zero, layout.dp, params.trainable, params.frozen
    if layout.dtype == "fp32":
        weight, grad16, grad32, optim = 4, 0, 4, 8
    else:
        weight, grad16, grad32, optim = 2, 2, 4, 12
    weight_share = 1 / dp if zero == 3 else 1
    if zero == 3:
        grad16 = 0  # reduce-scattered straight into the fp32 partition
    grads = train * (grad16 / (dp if zero >= 2 else 1) + grad32 / (dp if zero >= 1 else 1))
    states = train * optim / (dp if zero >= 1 else 1)
    gathered = 4 * params.largest_layer if zero == 3 else 0
    host = 0.0
    if layout.offload:
        host, grads, states = grads + states, 0.0, 0.0
    return ModelStates(
        train * weight * weight_share, frozen * weight * weight_share, grads, states, gathered, host
    )


# ---- the whole GPU ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    params: RankParams
    states: ModelStates
    activations: float  # at the start of backward, where they peak
    last_layer_activations: float  # what the bottom layer holds when nearly all gradients exist
    buffers: float  # DeepSpeed communication buckets + CUDA/NCCL context
    step_transient: float  # no ZeRO: the optimizer step's temporaries while gradients exist
    zero: int
    backward_bucket: float = 0.0  # ZeRO-1/2: the reduce bucket, allocated for backward only (in buffers)
    logits: float = 0.0  # the output layer's share of the activations, freed before any gradient

    @property
    def peak(self) -> float:
        s = self.states
        weights = s.weights_trainable + s.weights_frozen + s.gathered_layer
        if self.zero == 0:  # gradients are freed between steps and appear as activations go
            late = s.gradients + max(self.last_layer_activations, self.step_transient)
            return weights + s.optimizer + max(self.activations, late) + self.buffers
        # ZeRO-1/2: DeepSpeed sets up its reduce bucket at the first gradient, after the logits went
        backward = max(self.activations, self.activations - self.logits + self.backward_bucket)
        return s.gpu_total + backward + self.buffers - self.backward_bucket


def planner_model(cfg) -> PlannerModel:
    """The planner model `cfg`'s family registers; a family without one cannot be planned."""
    family = family_of(cfg)
    if family.planner is None:
        raise ValueError(
            f"model.family: {family.name} registers no planner model (ModelFamily.planner: its "
            "activation memory, recompute FLOPs and TP all-reduces), so cogvideo-plan cannot size it"
        )
    return family.planner


def plan_memory(cfg, layout: Layout, context_bytes: float = 2 * GiB) -> MemoryPlan:
    planner = planner_model(cfg)
    params = rank_params(cfg, layout.tp)
    states = model_states(params, layout)
    b, tp, dtype, e = layout.micro_batch, layout.tp, layout.dtype, layout.dtype_bytes
    # ZeRO-1/2 (DeepSpeed's stage_1_and_2): one reduce bucket (two with overlap_comm, which it leaves
    # off below ZeRO-3), set up at the first gradient and released after backward (measured on the
    # TP=8 slice, tests/test_scale_slice.py); ZeRO-3: reduce bucket + prefetch, held throughout
    buckets = {0: 0, 1: 1, 2: 1, 3: 1.1}[layout.zero] * layout.reduce_bucket * e
    # torch's single-tensor Adam: a square root and a quotient the size of the largest parameter
    transient = 2 * 4 * params.largest_trainable if layout.zero == 0 else 0
    return MemoryPlan(
        params,
        states,
        planner.activation_bytes(cfg, b, tp, dtype, layout.act_ckpt),
        planner.layer_activation_bytes(cfg, b, tp, dtype),
        buckets + context_bytes,
        transient,
        layout.zero,
        backward_bucket=buckets if layout.zero in (1, 2) else 0.0,
        logits=planner.logits_bytes(cfg, b, tp, dtype),
    )

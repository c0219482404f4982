"""The tensor-parallel plan: the one place a model family declares how it shards.

A family builds its model plain (torch `nn.Linear` / `nn.Embedding`, full shapes) and names,
by module-name suffix, how each layer splits over TP ranks. The same table then

- swaps in megatron-core's parallel layers holding this rank's shard (`parallelize`), and
- reshards state dicts for checkpoints (`TPPlan.shard_state_dict` / `merge_state_dicts`),

so the model and its checkpoints cannot disagree. Modules the plan does not name are
replicated. `parallelize` also applies activation checkpointing to the plan's blocks.

The plain model is built on the meta device and parallelized there; only then is memory
allocated (this rank's shards) and initialised, one full parameter at a time, so TP=n holds
exactly the TP=1 weights sliced (`cogvideo.family.build_model` runs these steps):

    plan = TPPlan({"attention.query_key_value": Column(stride=3), "attention.dense": Row(),
                   "word_embeddings": Vocab()}, blocks="layers")
    with torch.device("meta"):
        model = PlainModel(cfg)
    model = parallelize(model, plan, activation_checkpointing=True)
    materialize(model, device)
    init_from_full(model, plan, init_full)  # init_full(name, full tensor) fills it in place
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cogvideo import parallel


@dataclass(frozen=True)
class Column:
    """Output features split; `stride` interleaved blocks (e.g. 3 for [Q; K; V]) split each."""

    stride: int = 1

    def rule(self, param: str) -> tuple[int, int] | None:
        return (0, self.stride)


@dataclass(frozen=True)
class Row:
    """Input features split; the output is all-reduced and the bias stays whole."""

    def rule(self, param: str) -> tuple[int, int] | None:
        return (1, 1) if param == "weight" else None


@dataclass(frozen=True)
class Vocab:
    """Embedding rows (the vocabulary) split; a tied output layer gives vocabulary-parallel logits."""

    def rule(self, param: str) -> tuple[int, int] | None:
        return (0, 1)


@dataclass(frozen=True)
class Replicated:
    """Whole on every rank (the default for modules the plan does not name)."""

    def rule(self, param: str) -> tuple[int, int] | None:
        return None


Style = Column | Row | Vocab | Replicated


@dataclass(frozen=True)
class TPPlan:
    styles: dict[str, Style]  # module-name suffix (whole dotted parts) -> how it splits
    # the ModuleList whose entries are activation-checkpointed; several: those a model holds (a
    # family whose configurations hold different parts, e.g. GLOBER's two training phases)
    blocks: str | tuple[str, ...] | None = None

    def style(self, module: str) -> Style:
        for suffix, style in self.styles.items():
            if module == suffix or module.endswith("." + suffix):
                return style
        return Replicated()

    def rule(self, name: str) -> tuple[int, int] | None:
        """(dim, stride) along which parameter `name` splits over TP ranks, or None if replicated."""
        module, _, param = name.rpartition(".")
        return self.style(module).rule(param)

    def shard_tensor(
        self, name: str, tensor: torch.Tensor, rank: int, size: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rank `rank`'s part of the full `tensor` of parameter `name` (written into `out` if given)."""
        rule = self.rule(name)
        if rule is None or size == 1:
            return tensor if out is None else out.copy_(tensor)
        return split_tensor(tensor, *rule, rank, size, what=name, out=out)

    def merge_tensor(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        rule = self.rule(name)
        return parts[0] if rule is None or len(parts) == 1 else merge_tensors(parts, *rule)

    def full_shape(self, name: str, local_shape: tuple[int, ...], size: int) -> tuple[int, ...]:
        shape, rule = list(local_shape), self.rule(name)
        if rule is not None:
            shape[rule[0]] *= size
        return tuple(shape)

    def shard_state_dict(self, full: dict, rank: int, size: int) -> dict:
        """Full (unsharded) state dict -> the local state dict of TP rank `rank` of `size`."""
        return {name: self.shard_tensor(name, tensor, rank, size) for name, tensor in full.items()}

    def merge_state_dicts(self, local: list[dict]) -> dict:
        """Local state dicts of TP ranks 0..n-1 -> the full state dict (inverse of shard_state_dict)."""
        names = list(local[0])
        for rank, sd in enumerate(local[1:], start=1):
            if set(sd) != set(names):
                missing, extra = sorted(set(names) - set(sd)), sorted(set(sd) - set(names))
                raise ValueError(f"TP rank {rank} keys differ from rank 0: missing {missing}, extra {extra}")
        return {name: self.merge_tensor(name, [sd[name] for sd in local]) for name in names}


def split_tensor(
    tensor: torch.Tensor,
    dim: int,
    stride: int,
    rank: int,
    size: int,
    what: str = "tensor",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rank `rank`'s part: `stride` blocks, each cut into `size` pieces ([Q_r; K_r; V_r] for QKV),
    in a new tensor or written into `out`."""
    if tensor.shape[dim] % (stride * size):
        raise ValueError(
            f"{what}: dimension {dim} of size {tensor.shape[dim]} does not split into "
            f"{size} TP ranks x stride {stride}"
        )
    blocks = tensor.chunk(stride * size, dim=dim)
    return torch.cat([blocks[s * size + rank] for s in range(stride)], dim=dim, out=out)


def merge_tensors(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    size = len(parts)
    per_rank = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(size)], dim=dim)


# ---- applying the plan to a plain model ---------------------------------------------------


def parallelize(model: nn.Module, plan: TPPlan, activation_checkpointing: bool = False) -> nn.Module:
    """Swap every planned layer of a model built on the meta device for its megatron-core
    counterpart sized for this rank's shard (TP > 1 only; still on meta), then checkpoint each of
    `plan.blocks` (if asked). In place; `materialize` and `init_from_full` allocate and fill it."""
    size = parallel.tp_size()
    if size > 1:
        for name, module in list(model.named_modules()):
            style = plan.style(name)
            if name and not isinstance(style, Replicated):
                model.set_submodule(name, _parallel_layer(name, module, style, plan, size))
    if activation_checkpointing:
        if plan.blocks is None:
            raise ValueError("activation checkpointing needs the plan's `blocks` (the layers to recompute)")
        from torch.distributed._composable import checkpoint

        for block in _checkpointed_blocks(model, plan):  # recomputed in backward, names and state
            # dict keys unchanged; the recomputation redraws the forward's dropout masks (torch
            # restores its generators, parallel.replay_model_parallel_rng the per-TP-rank state)
            checkpoint(block, context_fn=parallel.replay_model_parallel_rng)
    return model


def _checkpointed_blocks(model: nn.Module, plan: TPPlan) -> list[nn.Module]:
    paths = (plan.blocks,) if isinstance(plan.blocks, str) else plan.blocks
    held = [path for path in paths if _has_submodule(model, path)]
    if not held:
        raise ValueError(f"activation checkpointing: the model holds none of the plan's blocks {list(paths)}")
    return [block for path in held for block in model.get_submodule(path)]


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate the parameters of a meta-built (parallelized) model on `device`, uninitialised.
    Keeps the attributes megatron-core marks its parameters with (`to_empty` makes new ones)."""
    marks = {name: dict(param.__dict__) for name, param in model.named_parameters()}
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        param.__dict__.update(marks[name])
    return model


@torch.no_grad()
def init_from_full(model: nn.Module, plan: TPPlan, init_full: Callable[[str, torch.Tensor], None]) -> None:
    """Initialise every parameter as the plain model's: walking the parameters in the model's
    order, draw each full (unsharded) tensor on its device with `init_full(name, tensor)` and keep
    this rank's shard of it. The random stream is the same at every TP degree, so TP=n holds the
    TP=1 weights sliced; the extra memory is one full split parameter at a time."""
    rank, size = parallel.tp_rank(), parallel.tp_size()
    for name, param in model.named_parameters():
        if size == 1 or plan.rule(name) is None:  # whole on this rank: drawn in place
            init_full(name, param)
            continue
        full = torch.empty(plan.full_shape(name, param.shape, size), dtype=param.dtype, device=param.device)
        init_full(name, full)
        plan.shard_tensor(name, full, rank, size, out=param)
        del full  # before the next one is allocated: one full parameter at a time


def _parallel_layer(name: str, plain: nn.Module, style: Style, plan: TPPlan, size: int) -> nn.Module:
    weight = plain.weight
    if not weight.is_meta:
        raise ValueError(
            f"TP plan: {name} holds {weight.device} weights; parallelize a model built on the meta "
            "device (cogvideo.family.build_model), then load or initialise its shards"
        )
    config = _megatron_config(size, weight.dtype)
    column, row, vocab = _megatron_classes()
    keep = nn.init.zeros_  # never called (perform_initialization is off): init_from_full fills the shards
    with torch.device("meta"):
        if isinstance(style, Vocab):
            if not isinstance(plain, nn.Embedding):
                raise TypeError(f"TP plan: {name} is planned as Vocab but is a {type(plain).__name__}")
            layer = vocab(plain.num_embeddings, plain.embedding_dim, init_method=keep, config=config)
        elif not isinstance(plain, nn.Linear) or plain.bias is None:
            raise TypeError(
                f"TP plan: {name} is planned as {type(style).__name__} but is not an nn.Linear with bias"
            )
        else:
            linear = dict(
                input_size=plain.in_features,
                output_size=plain.out_features,
                bias=True,
                config=config,
                init_method=keep,
            )
            if isinstance(style, Column):
                layer = column(**linear, gather_output=False, stride=style.stride)
            else:
                layer = row(**linear, input_is_parallel=True, skip_bias_add=False)
    for param_name, param in layer.named_parameters():
        rule = plan.rule(f"{name}.{param_name}")
        param.requires_grad_(getattr(plain, param_name).requires_grad)
        if rule is not None and not hasattr(param, "tensor_model_parallel"):
            # what megatron's own initialisation would mark (DeepSpeed's grad norm counts these
            # on every TP rank, replicated ones once)
            param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, *rule
    return layer


def _megatron_config(size: int, dtype: torch.dtype):
    """Host-style allocation (`use_cpu_initialization`), which honours the meta device the layers
    are made on; the GPU style would allocate on the current GPU whatever the device context."""
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=size,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
    )


@functools.cache
def _megatron_classes():
    """megatron-core's layers returning the output alone (they return (output, bias))."""
    from megatron.core import tensor_parallel as tp

    class ColumnParallelLinear(tp.ColumnParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    class RowParallelLinear(tp.RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    class VocabParallelEmbedding(tp.VocabParallelEmbedding):
        def unembed(self, x: torch.Tensor) -> torch.Tensor:
            """Tied output layer: this rank's vocabulary shard of the logits."""
            return F.linear(tp.copy_to_tensor_model_parallel_region(x), self.weight)

    return ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


class TiedEmbedding(nn.Embedding):
    """An embedding whose weight is also the output layer (`unembed`); a `Vocab` plan entry
    turns it into megatron-core's VocabParallelEmbedding with the same `unembed`."""

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def vocab_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-token cross entropy over the first `num_classes` ids, for the logits of a `Vocab`-split
    output layer ([..., V / tp] on each TP rank; the whole vocabulary without TP)."""
    size = parallel.tp_size()
    if size == 1:
        return F.cross_entropy(
            logits[..., :num_classes].float().flatten(0, -2), targets.flatten(), reduction="none"
        ).view_as(targets)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    local = logits.shape[-1]
    ids = torch.arange(local, device=logits.device) + parallel.tp_rank() * local
    return vocab_parallel_cross_entropy(logits.float().masked_fill(ids >= num_classes, -1e30), targets)

"""The tensor-parallel plan: the one place a model family declares how it shards.

A family builds its model plain (torch `nn.Linear` / `nn.Embedding`, full shapes) and names,
by module-name suffix, how each layer splits over TP ranks. The same table then

- swaps in megatron-core's parallel layers holding this rank's shard (`parallelize`), and
- reshards state dicts for checkpoints (`TPPlan.shard_state_dict` / `merge_state_dicts`),

so the model and its checkpoints cannot disagree. Modules the plan does not name are
replicated. `parallelize` also applies activation checkpointing to the plan's blocks.

    plan = TPPlan({"attention.query_key_value": Column(stride=3), "attention.dense": Row(),
                   "word_embeddings": Vocab()}, blocks="layers")
    model = parallelize(PlainModel(cfg), plan, activation_checkpointing=True)
"""

from __future__ import annotations

import functools
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
    blocks: str | None = None  # the ModuleList whose entries are activation-checkpointed

    def style(self, module: str) -> Style:
        for suffix, style in self.styles.items():
            if module == suffix or module.endswith("." + suffix):
                return style
        return Replicated()

    def rule(self, name: str) -> tuple[int, int] | None:
        """(dim, stride) along which parameter `name` splits over TP ranks, or None if replicated."""
        module, _, param = name.rpartition(".")
        return self.style(module).rule(param)

    def shard_tensor(self, name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        rule = self.rule(name)
        if rule is None or size == 1:
            return tensor
        return split_tensor(tensor, *rule, rank, size, what=name)

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


def split_tensor(tensor: torch.Tensor, dim: int, stride: int, rank: int, size: int, what: str = "tensor"):
    """Rank `rank`'s part: `stride` blocks, each cut into `size` pieces ([Q_r; K_r; V_r] for QKV)."""
    if tensor.shape[dim] % (stride * size):
        raise ValueError(
            f"{what}: dimension {dim} of size {tensor.shape[dim]} does not split into "
            f"{size} TP ranks x stride {stride}"
        )
    blocks = tensor.chunk(stride * size, dim=dim)
    return torch.cat([blocks[s * size + rank] for s in range(stride)], dim=dim).contiguous()


def merge_tensors(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    size = len(parts)
    per_rank = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(size)], dim=dim)


# ---- applying the plan to a plain model ---------------------------------------------------


def parallelize(model: nn.Module, plan: TPPlan, activation_checkpointing: bool = False) -> nn.Module:
    """Swap every planned layer for its megatron-core counterpart holding this rank's shard of
    the plain weights (TP > 1 only), then checkpoint each of `plan.blocks` (if asked). In place."""
    size = parallel.tp_size()
    if size > 1:
        rank = parallel.tp_rank()
        for name, module in list(model.named_modules()):
            style = plan.style(name)
            if name and not isinstance(style, Replicated):
                model.set_submodule(name, _parallel_layer(name, module, style, plan, rank, size))
    if activation_checkpointing:
        if plan.blocks is None:
            raise ValueError("activation checkpointing needs the plan's `blocks` (the layers to recompute)")
        from torch.distributed._composable import checkpoint

        for block in model.get_submodule(plan.blocks):  # recomputed in backward, names and state
            # dict keys unchanged; the recomputation redraws the forward's dropout masks (torch
            # restores its generators, parallel.replay_model_parallel_rng the per-TP-rank state)
            checkpoint(block, context_fn=parallel.replay_model_parallel_rng)
    return model


def _parallel_layer(
    name: str, plain: nn.Module, style: Style, plan: TPPlan, rank: int, size: int
) -> nn.Module:
    weight = plain.weight
    config = _megatron_config(size, weight.dtype, weight.device.type == "cuda")
    column, row, vocab = _megatron_classes()
    keep = nn.init.zeros_  # never called (perform_initialization is off): the plain weights are copied
    with torch.device("meta" if weight.is_meta else "cpu"):  # on GPUs megatron allocates on the current one
        if isinstance(style, Vocab):
            if not isinstance(plain, nn.Embedding):
                raise TypeError(f"TP plan: {name} is planned as Vocab but is a {type(plain).__name__}")
            layer = vocab(plain.num_embeddings, plain.embedding_dim, init_method=keep, config=config)
        elif not isinstance(plain, nn.Linear) or plain.bias is None:
            raise TypeError(
                f"TP plan: {name} is planned as {type(style).__name__} but is not an nn.Linear with bias"
            )
        elif isinstance(style, Column):
            layer = column(
                plain.in_features,
                plain.out_features,
                config=config,
                init_method=keep,
                bias=True,
                gather_output=False,
                stride=style.stride,
            )
        else:
            layer = row(
                plain.in_features,
                plain.out_features,
                config=config,
                init_method=keep,
                bias=True,
                input_is_parallel=True,
                skip_bias_add=False,
            )
    with torch.no_grad():
        for param_name, param in layer.named_parameters():
            source, rule = getattr(plain, param_name), plan.rule(f"{name}.{param_name}")
            if source.device.type != "meta":
                param.copy_(plan.shard_tensor(f"{name}.{param_name}", source, rank, size))
            param.requires_grad_(source.requires_grad)
            if rule is not None and not hasattr(param, "tensor_model_parallel"):
                # what megatron's own initialisation would mark (DeepSpeed's grad norm counts these
                # on every TP rank, replicated ones once)
                param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, *rule
    return layer


def _megatron_config(size: int, dtype: torch.dtype, on_gpu: bool):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=size,
        use_cpu_initialization=not on_gpu,
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

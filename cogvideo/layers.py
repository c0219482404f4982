"""Linear and embedding layers: plain torch at TP=1, megatron-core's parallel layers when a
tensor-parallel group of size > 1 exists. Parameter names and full shapes are the same either
way, so state dicts move between the two through `cogvideo.parallel.shard_state_dict`."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from cogvideo import parallel


def _normal(std: float):
    return functools.partial(nn.init.normal_, mean=0.0, std=std)


@functools.cache
def _megatron_classes():
    from megatron.core import tensor_parallel as tp

    class Column(tp.ColumnParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    class Row(tp.RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    return Column, Row, tp.VocabParallelEmbedding


class LayerFactory:
    """Builds each layer for the current TP degree, on the default device (`with torch.device(...)`).

    megatron-core's parallel layers initialise where the model is built: on a GPU each rank draws
    its own shard from the tensor-parallel RNG tracker (`parallel.manual_seed` seeds it); on the
    CPU (and the meta device) every rank draws the full weight from torch's RNG and keeps its
    slice, so TP=n starts from the same weights as TP=1."""

    def __init__(self):
        self.tp = parallel.tp_size()
        if self.tp > 1:
            from megatron.core import ModelParallelConfig

            self.mp_config = ModelParallelConfig(
                tensor_model_parallel_size=self.tp,
                use_cpu_initialization=torch.get_default_device().type != "cuda",
                gradient_accumulation_fusion=False, params_dtype=torch.float32)

    def column(self, in_features: int, out_features: int, std: float, stride: int = 1) -> nn.Module:
        """Output features split over TP ranks (with `stride` interleaved blocks, e.g. Q, K, V)."""
        if self.tp == 1:
            return _init(nn.Linear(in_features, out_features), std)
        column, _, _ = _megatron_classes()
        return column(in_features, out_features, config=self.mp_config, init_method=_normal(std),
                      bias=True, gather_output=False, stride=stride)

    def row(self, in_features: int, out_features: int, std: float) -> nn.Module:
        """Input features split over TP ranks; the output is all-reduced."""
        if self.tp == 1:
            return _init(nn.Linear(in_features, out_features), std)
        _, row, _ = _megatron_classes()
        return row(in_features, out_features, config=self.mp_config, init_method=_normal(std),
                   bias=True, input_is_parallel=True, skip_bias_add=False)

    def embedding(self, num: int, dim: int, std: float) -> nn.Module:
        """Vocabulary rows split over TP ranks."""
        if self.tp == 1:
            emb = nn.Embedding(num, dim)
            nn.init.normal_(emb.weight, std=std)
            return emb
        _, _, vocab = _megatron_classes()
        return vocab(num, dim, init_method=_normal(std), config=self.mp_config)


def _init(linear: nn.Linear, std: float) -> nn.Linear:
    nn.init.normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)
    return linear


def copy_to_tp_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over TP ranks (before a column-split use)."""
    if parallel.tp_size() == 1:
        return x
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x)


def image_token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """Per-token cross entropy over the image ids only, for (vocab-parallel) logits [..., V/tp]."""
    tp = parallel.tp_size()
    if tp == 1:
        image_logits = logits[..., :num_image_tokens].float()
        return F.cross_entropy(image_logits.flatten(0, -2), targets.flatten(), reduction="none").view_as(targets)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    local = logits.shape[-1]
    ids = torch.arange(local, device=logits.device) + parallel.tp_rank() * local
    masked = logits.float().masked_fill(ids >= num_image_tokens, -1e30)
    return vocab_parallel_cross_entropy(masked, targets)

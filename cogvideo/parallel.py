"""The parallel state: one place that sets up tensor-parallel (megatron-core) and data-parallel
groups, hands DeepSpeed an `mpu`, and knows how each parameter splits across TP ranks.

Without `init_distributed` everything reports TP=1/DP=1 and the model uses plain torch layers.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and _ps().model_parallel_is_initialized()


def init_distributed(tensor_parallel: int, backend: str | None = None, timeout_s: int = 1800) -> None:
    """torch.distributed from the launcher's env (RANK, WORLD_SIZE, MASTER_ADDR/PORT), then
    megatron-core TP groups. gloo on CPU, NCCL when CUDA is present."""
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % tensor_parallel:
        raise ValueError(f"parallel.tensor_parallel={tensor_parallel} does not divide world size {world}")
    ps = _ps()
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != tensor_parallel:
            raise RuntimeError("parallel state already initialised with a different TP size")
        return
    # extra gloo groups only matter beside NCCL; on gloo the default groups already are gloo
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                 create_gloo_process_groups=dist.get_backend() != "gloo")


def manual_seed(seed: int) -> None:
    """Seed what the model draws from: torch's generators (identical on every rank) and, with CUDA,
    megatron-core's RNG tracker, whose tensor-parallel state differs between TP peers (its
    parallel layers fork it to initialise their shards on the GPU)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available() and is_initialized():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def device() -> torch.device:
    """Where this rank's model lives: its GPU (LOCAL_RANK, set by init_distributed) or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def destroy() -> None:
    if is_initialized():
        _ps().destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def tp_size() -> int:
    return _ps().get_tensor_model_parallel_world_size() if is_initialized() else 1


def tp_rank() -> int:
    return _ps().get_tensor_model_parallel_rank() if is_initialized() else 0


def tp_group():
    return _ps().get_tensor_model_parallel_group() if is_initialized() else None


def dp_size() -> int:
    return _ps().get_data_parallel_world_size() if is_initialized() else 1


def dp_rank() -> int:
    return _ps().get_data_parallel_rank() if is_initialized() else 0


def dp_group():
    return _ps().get_data_parallel_group() if is_initialized() else None


class DeepSpeedMPU:
    """What `deepspeed.initialize(mpu=...)` asks of Megatron's mpu, over megatron-core state,
    so DeepSpeed's data-parallel groups exclude tensor-parallel peers."""

    get_model_parallel_rank = staticmethod(tp_rank)
    get_model_parallel_world_size = staticmethod(tp_size)
    get_model_parallel_group = staticmethod(tp_group)
    get_tensor_model_parallel_rank = staticmethod(tp_rank)
    get_tensor_model_parallel_world_size = staticmethod(tp_size)
    get_tensor_model_parallel_group = staticmethod(tp_group)
    get_data_parallel_rank = staticmethod(dp_rank)
    get_data_parallel_world_size = staticmethod(dp_size)
    get_data_parallel_group = staticmethod(dp_group)

    @staticmethod
    def get_pipeline_model_parallel_world_size() -> int:
        return 1

    @staticmethod
    def get_pipeline_model_parallel_rank() -> int:
        return 0


def mpu() -> DeepSpeedMPU:
    return DeepSpeedMPU()


# ---- how parameters split over tensor-parallel ranks ------------------------------------

_QKV = ".query_key_value."
_ROW_SPLIT = (".attention.dense.weight", ".temporal_attention.dense.weight", ".mlp.dense_4h_to_h.weight")


def split_rule(name: str) -> tuple[int, int] | None:
    """(dim, stride) along which parameter `name` is split over TP ranks, or None if replicated.

    QKV is [Q; K; V] in full form and [Q_r; K_r; V_r] on rank r (stride 3); FFN-in is a plain
    column split; the attention/FFN output projections split by input columns; the word
    embedding by vocabulary rows. Norms, biases of row-split layers and position tables are
    replicated."""
    if _QKV in name:
        return (0, 3)
    if name.endswith(".mlp.dense_h_to_4h.weight") or name.endswith(".mlp.dense_h_to_4h.bias"):
        return (0, 1)
    if name.endswith(_ROW_SPLIT):
        return (1, 1)
    if name == "word_embeddings.weight":
        return (0, 1)
    return None


def split_tensor(tensor: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] % (stride * size):
        raise ValueError(f"dimension {dim} of size {tensor.shape[dim]} does not split into {size} ranks x stride {stride}")
    blocks = tensor.chunk(stride * size, dim=dim)
    return torch.cat([blocks[s * size + rank] for s in range(stride)], dim=dim).contiguous()


def merge_tensors(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    size = len(parts)
    per_rank = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(size)], dim=dim)


def shard_state_dict(full: dict, rank: int, size: int) -> dict:
    """Full (unsharded) state dict -> the local state dict of TP rank `rank` of `size`."""
    out = {}
    for name, tensor in full.items():
        rule = split_rule(name)
        out[name] = tensor if rule is None or size == 1 else split_tensor(tensor, *rule, rank, size)
    return out


def merge_state_dicts(local: list[dict]) -> dict:
    """Local state dicts of TP ranks 0..n-1 -> the full state dict (inverse of shard_state_dict)."""
    if len(local) == 1:
        return dict(local[0])
    names = list(local[0])
    for rank, sd in enumerate(local[1:], start=1):
        if set(sd) != set(names):
            missing, extra = sorted(set(names) - set(sd)), sorted(set(sd) - set(names))
            raise ValueError(f"TP rank {rank} keys differ from rank 0: missing {missing}, extra {extra}")
    out = {}
    for name in names:
        rule = split_rule(name)
        parts = [sd[name] for sd in local]
        out[name] = parts[0] if rule is None else merge_tensors(parts, *rule)
    return out

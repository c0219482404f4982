"""The parallel state: one place that sets up tensor-parallel (megatron-core) and data-parallel
groups and hands DeepSpeed an `mpu`. How a model splits over TP ranks is its TP plan
(cogvideo/tp_plan.py).

Without `init_distributed` everything reports TP=1/DP=1 and `parallelize` keeps the plain layers.
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
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, create_gloo_process_groups=dist.get_backend() != "gloo"
    )


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
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


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

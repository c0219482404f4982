"""The parallel state: one place that sets up tensor-parallel (megatron-core) and data-parallel
groups, hands DeepSpeed an `mpu`, and owns the model-parallel RNG state. How a model splits over
TP ranks is its TP plan (cogvideo/tp_plan.py).

Without `init_distributed` everything reports TP=1/DP=1 and `parallelize` keeps the plain layers.

Randomness under TP, as in Megatron: torch's generators are seeded alike on TP peers, so dropout
on replicated activations (embeddings, hidden states) draws the same masks on every peer; dropout
on this rank's share of the heads (attention probabilities) draws inside
`model_parallel_rng(device)` from a per-rank state seeded `seed + 2718 + tp_rank` (megatron-core's
CUDA tracker on GPUs, `HostRNGTracker` on the CPU). Activation checkpointing replays it
(`replay_model_parallel_rng`) and training checkpoints keep it (`model_parallel_rng_states`).
"""

from __future__ import annotations

import contextlib
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


MODEL_PARALLEL_RNG = "model-parallel-rng"  # megatron-core's name for the per-TP-rank state


def manual_seed(seed: int) -> None:
    """Seed what the model draws from: torch's generators with `seed` (the same on every rank
    given the same seed) and the model-parallel state with `seed + 2718 + tp_rank`, megatron's
    formula: on the CPU here, and with CUDA in megatron-core's RNG tracker (which its parallel
    layers also fork to initialise their shards on the GPU)."""
    torch.manual_seed(seed)
    HOST_RNG_TRACKER.reset()
    HOST_RNG_TRACKER.add(MODEL_PARALLEL_RNG, seed + 2718 + tp_rank())
    if torch.cuda.is_available() and is_initialized():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


class HostRNGTracker:
    """megatron-core's `CudaRNGStatesTracker` for torch's CPU generator (megatron's swaps CUDA
    generator states only): named generator states, one swapped in for the draws inside `fork`."""

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.states = {}

    def add(self, name: str, seed: int) -> None:
        self.states[name] = torch.Generator().manual_seed(seed).get_state()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = dict(states)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states:
            raise RuntimeError(
                f"the {name} RNG state is not seeded: call cogvideo.parallel.manual_seed(seed) "
                "after init_distributed (attention dropout under tensor parallelism draws from it)"
            )
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


HOST_RNG_TRACKER = HostRNGTracker()


def _cuda_rng_tracker():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def model_parallel_rng(device: torch.device):
    """Context: draws on `device` inside come from this TP rank's own state, not torch's shared
    one (for dropout on this rank's heads). Without TP: nothing changes, the draws stay in
    torch's stream as they always were."""
    if tp_size() == 1:
        return contextlib.nullcontext()
    tracker = _cuda_rng_tracker() if torch.device(device).type == "cuda" else HOST_RNG_TRACKER
    return tracker.fork(MODEL_PARALLEL_RNG)


def model_parallel_rng_states() -> dict:
    """This rank's model-parallel RNG states (CPU, and with CUDA megatron's tracker), as tensors."""
    states = {"cpu": HOST_RNG_TRACKER.get_states()}
    if torch.cuda.is_available():
        states["cuda"] = _cuda_rng_tracker().get_states()
    return states


def set_model_parallel_rng_states(states: dict) -> None:
    HOST_RNG_TRACKER.set_states(states.get("cpu", {}))
    if "cuda" in states and torch.cuda.is_available():
        _cuda_rng_tracker().set_states(dict(states["cuda"]))  # megatron keeps the dict it is given


def replay_model_parallel_rng():
    """`context_fn` for torch's activation checkpointing, which restores torch's generators for
    the recomputed forward but not these: the recomputation starts from the model-parallel
    states the forward started from (so it redraws the same masks), and the live states
    continue afterwards (megatron's `tensor_parallel.checkpoint` does the same)."""
    at_forward = model_parallel_rng_states()

    @contextlib.contextmanager
    def recompute():
        live = model_parallel_rng_states()
        set_model_parallel_rng_states(at_forward)
        try:
            yield
        finally:
            set_model_parallel_rng_states(live)

    return contextlib.nullcontext(), recompute()


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

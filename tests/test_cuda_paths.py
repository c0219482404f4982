"""Where the CUDA path differs from the CPU one (docs/cuda-paths.md): each runs here up to the
device call; benchmarks/gpu_check.py runs them on a GPU."""

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from benchmarks.memtrack import LiveTensorBytes
from cogvideo import parallel
from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.model import TP_PLAN
from cogvideo.tp_plan import _megatron_config, parallelize
from pretrain.config import TrainConfig
from pretrain.optim import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


def test_with_cuda_the_model_is_allocated_on_the_ranks_gpu_after_a_meta_build(monkeypatch):
    """The first allocation of the build is `to_empty` onto this rank's GPU, of a model that is
    still wholly on the meta device: no host copy of the weights is ever made."""

    class Stop(Exception):
        pass

    targets = []

    def to_empty(module, *, device, recurse=True):
        targets.append((torch.device(device), {p.device.type for p in module.parameters()}))
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.nn.Module, "to_empty", to_empty)
    with LiveTensorBytes() as mem, pytest.raises(Stop):
        build_model(get_preset("tiny-stage2"))
    assert targets == [(torch.device("cuda", 3), {"meta"})]
    assert mem.peak == 0


def test_initialisation_draws_on_the_parameters_device():
    """Built for the meta device, allocation and initialisation (each full parameter drawn, then
    sliced) touch no host memory: the draws follow the parameters onto the rank's device."""
    with LiveTensorBytes() as mem:
        model = build_model(get_preset("tiny-stage2"), device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"} and mem.peak == 0
    # megatron-core's GPU style would allocate its layers on the current GPU whatever the device
    # context; the host style honours the meta device they are made on
    assert _megatron_config(2, torch.float32).use_cpu_initialization
    assert not _megatron_config(2, torch.float32).perform_initialization


def test_manual_seed_seeds_the_model_parallel_state_and_megatrons_tracker_only_with_cuda(monkeypatch):
    from megatron.core import tensor_parallel

    seeds = []
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", seeds.append)
    monkeypatch.setattr(parallel, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel, "tp_rank", lambda: 3)
    parallel.manual_seed(5)
    assert seeds == [] and torch.initial_seed() == 5
    host = parallel.HOST_RNG_TRACKER.get_states()[parallel.MODEL_PARALLEL_RNG]
    assert torch.equal(host, torch.Generator().manual_seed(5 + 2718 + 3).get_state())  # megatron's formula
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parallel.manual_seed(6)
    assert seeds == [6] and torch.initial_seed() == 6


class CudaTracker:
    """megatron-core's CudaRNGStatesTracker up to the device: records its forks, holds states."""

    def __init__(self):
        self.forks, self.states = [], {parallel.MODEL_PARALLEL_RNG: torch.tensor([1])}

    @contextlib.contextmanager
    def fork(self, name):
        self.forks.append(name)
        yield

    def get_states(self):
        return dict(self.states)

    def set_states(self, states):
        self.states = states


def test_with_cuda_attention_dropout_forks_megatrons_tracker_and_recomputation_restores_it(monkeypatch):
    from megatron.core import tensor_parallel

    tracker = CudaTracker()
    monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker", lambda: tracker)
    with parallel.model_parallel_rng(torch.device("cuda", 0)):  # TP=1: torch's stream, no fork
        pass
    monkeypatch.setattr(parallel, "tp_size", lambda: 2)
    with parallel.model_parallel_rng(torch.device("cuda", 0)):
        pass
    assert tracker.forks == [parallel.MODEL_PARALLEL_RNG]
    parallel.HOST_RNG_TRACKER.add(parallel.MODEL_PARALLEL_RNG, 0)
    with parallel.model_parallel_rng(torch.device("cpu")):  # CPU tensors: the host tracker
        pass
    assert tracker.forks == [parallel.MODEL_PARALLEL_RNG]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parallel.model_parallel_rng_states()["cuda"] == tracker.states  # kept in training checkpoints
    _, recompute = parallel.replay_model_parallel_rng()  # at a checkpointed block's forward
    tracker.states = {parallel.MODEL_PARALLEL_RNG: torch.tensor([2])}  # the forward drew from it
    with recompute:
        assert tracker.states == {parallel.MODEL_PARALLEL_RNG: torch.tensor([1])}
    assert tracker.states == {parallel.MODEL_PARALLEL_RNG: torch.tensor([2])}


def test_with_cuda_the_process_group_is_nccl_on_the_local_gpu(monkeypatch):
    calls = []

    class Stop(Exception):
        pass

    def init_process_group(backend, timeout):
        calls.append(("init", backend))
        raise Stop

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("device", index)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(Stop):
        parallel.init_distributed(tensor_parallel=1)
    assert calls == [("device", 3), ("init", "nccl")]
    assert parallel.device() == torch.device("cuda", 3)


@pytest.mark.parametrize("tensor_parallel", [False, True])
def test_recomputation_replays_the_dropout_masks(monkeypatch, tensor_parallel):
    """Dropout draws from torch's generator and, for the attention probabilities under TP, from
    this rank's model-parallel state (here one process draws as a TP rank does: `tp_size`
    patched for the forward). Activation checkpointing (applied by parallelize) restores both
    for the recomputed forward: gradients are bit-identical and both streams continue alike."""
    cfg = get_preset("tiny-stage2").replace(train_backbone=True, hidden_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    tokens = torch.randint(0, cfg.vocab.num_image_tokens, (2, cfg.seq_length))
    probe = torch.randn(2, cfg.seq_length, cfg.vocab.vocab_size)  # the loss: logits . probe
    runs = []
    for ckpt in (False, True):
        if ckpt:
            parallelize(model, TP_PLAN, activation_checkpointing=True)
        model.zero_grad(set_to_none=True)
        parallel.manual_seed(1)
        with monkeypatch.context() as patch:
            if tensor_parallel:
                patch.setattr(parallel, "tp_size", lambda: 2)
            (model(tokens) * probe).sum().backward()
        streams = [
            torch.get_rng_state(),
            parallel.model_parallel_rng_states()["cpu"][parallel.MODEL_PARALLEL_RNG],
        ]
        runs.append(([p.grad.clone() for p in model.parameters()], streams))
    (grads, streams), (grads_ckpt, streams_ckpt) = runs
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ckpt))
    assert all(torch.equal(a, b) for a, b in zip(streams, streams_ckpt))
    moved = not torch.equal(streams[1], torch.Generator().manual_seed(1 + 2718).get_state())
    assert moved == tensor_parallel  # under TP the attention masks came from the model-parallel state


def test_fp16_follows_cogvideos_published_loss_scaling():
    """scripts/ds_config_zero.json of THUDM/CogVideo: fp16, loss_scale 0 (dynamic, from DeepSpeed's
    default 2**16), loss_scale_window 400, hysteresis 2, min_loss_scale 1."""
    cfg = TrainConfig()
    cfg.parallel.precision = "fp16"
    fp16 = deepspeed_config(cfg, dp_size=8)["fp16"]
    assert fp16 == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 16,
        "loss_scale_window": 400,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }


def test_nccl_settings_are_exported_by_the_launch_scripts():
    env = (ROOT / "cluster/slurm/nccl.env").read_text()
    exported = env.split("export", 1)[1].split()
    for var in (
        "NCCL_IB_HCA",
        "NCCL_SOCKET_IFNAME",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING",
        "CUDA_DEVICE_MAX_CONNECTIONS",
    ):
        assert var in exported and f"${{{var}:=" in env
    assert "nccl.env" in (ROOT / "cluster/slurm/train.sbatch").read_text()

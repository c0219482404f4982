"""Optimizer parameter groups, the learning-rate schedule and the DeepSpeed config they imply.

The DeepSpeed JSON config is generated from the training dataclasses; there is no separate
DeepSpeed file to keep in sync.
"""

from __future__ import annotations

import math

import torch

from pretrain.config import TrainConfig

NO_DECAY_SUFFIXES = (".bias", "temporal_gate")
# DeepSpeed allocates ZeRO's gradient-reduction bucket afresh for every micro-step. On the CPU that
# buffer comes from malloc: at DeepSpeed's default size (5e8 elements, 2 GB) each step maps fresh
# pages and faults in every one it touches (~14 ms a step on the small preset, 3 % of it), while a
# bucket below glibc's largest mmap threshold (32 MiB) is handed the same heap memory every step.
CPU_REDUCE_BUCKET = 2**22  # elements: 16 MiB of fp32 gradients per reduction


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases and the temporal mixing gates are not decayed."""
    return name.endswith(NO_DECAY_SUFFIXES) or "layernorm" in name or param.ndim < 2


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only (the frozen backbone never reaches the optimizer)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ValueError(
            "the model has no trainable parameters (is the backbone frozen on a backbone-only model?)"
        )
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup from 0 to 1 over `warmup_steps`, then cosine down to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_scheduler(cfg: TrainConfig, total_steps: int | None = None):
    """A factory DeepSpeed calls with its optimizer; stepped once per optimizer step. The cosine
    ends at `total_steps` of this optimizer (default training.max_steps: it steps every step)."""
    o = cfg.optim
    total = cfg.training.max_steps if total_steps is None else total_steps

    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, o.warmup_steps, total, o.min_lr_ratio)
        )

    return make


def deepspeed_config(cfg: TrainConfig, dp_size: int) -> dict:
    p, o, t = cfg.parallel, cfg.optim, cfg.training
    cuda = torch.cuda.is_available()
    zero: dict = {"stage": p.zero_stage}
    if not cuda:
        zero["reduce_bucket_size"] = CPU_REDUCE_BUCKET
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if p.zero_stage == 3:
        # keep small models whole per layer; the defaults assume billions of parameters
        zero["stage3_param_persistence_threshold"] = 0
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # DeepSpeed's fused/CPU Adam ops are JIT-built C++/CUDA; on CPU torch's AdamW
                # avoids that build and is what the equivalence tests compare against; fused: one
                # pass over ZeRO's flat partition instead of one per term of the update (the step
                # took 2.3x less CPU time on the small preset)
                "torch_adam": not cuda,
                **({} if cuda else {"fused": True}),
            },
        },
        "zero_force_ds_cpu_optimizer": cuda,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if p.precision == "bf16":
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif p.precision == "fp16":  # CogVideo's recipe (its scripts/ds_config_zero.json): dynamic scale,
        # halved after 2 overflowing steps in a row, doubled after 400 clean ones, never below 1
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": p.initial_loss_scale_power,
            "loss_scale_window": 400,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return config

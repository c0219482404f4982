"""Optimizer parameter groups, the learning-rate schedule and the DeepSpeed config they imply.

The DeepSpeed JSON config is generated from the training dataclasses; there is no separate
DeepSpeed file to keep in sync.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

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


def param_groups(model: torch.nn.Module, weight_decay: float, named: bool = False) -> list[dict]:
    """Trainable parameters only (the frozen backbone never reaches the optimizer). `named`:
    (name, parameter) pairs, as torch.optim takes them to name the parameters in its state_dict."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append((name, param) if named else param)
    if not decay and not no_decay:
        raise ValueError(
            "the model has no trainable parameters (is the backbone frozen on a backbone-only model?)"
        )
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm and skips a step whose norm is not finite,
    as DeepSpeed's ZeRO optimizers do: at ZeRO stage 0 DeepSpeed steps the optimizer it is given
    as it is, so the NaN guard (`engine.was_step_applied`) and the norm
    (`engine.get_global_grad_norm`) come from here. The norm counts tensor-parallel shards on
    every rank of `tp_group` and replicated parameters once; gradients are already averaged over
    data-parallel ranks when DeepSpeed steps. The parameter groups name their parameters
    (`param_groups(named=True)`), so the saved state says whose moments are whose.

    With `master_weights` the optimizer steps fp32 copies of the (fp32) parameters it is given,
    taken at construction, and copies them back into those parameters after each step: the
    model may then be cast to bf16, as DeepSpeed's bf16 optimizers keep fp32 master weights. The
    copies are saved with the state (``master_weights``, in the order of the state's indices)."""

    def __init__(self, params, *, clip: float, tp_group=None, master_weights: bool = False, **adamw):
        groups = list(params)  # torch.optim's forms: tensors, (name, tensor) pairs, or groups of either
        groups = [dict(g) for g in groups] if groups and isinstance(groups[0], dict) else [{"params": groups}]
        self.model_params = None
        if master_weights:
            self.model_params = [e[1] if isinstance(e, tuple) else e for g in groups for e in g["params"]]
            for g in groups:
                g["params"] = [
                    (e[0], _master_copy(e[1])) if isinstance(e, tuple) else _master_copy(e)
                    for e in g["params"]
                ]
        super().__init__(groups, **adamw)
        self.clip, self.tp_group = clip, tp_group
        self.overflow, self._global_grad_norm = False, None

    @property
    def masters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def grad_norm(self) -> torch.Tensor:
        first_rank = self.tp_group is None or dist.get_rank(self.tp_group) == 0
        grads = [
            p.grad
            for p in self.masters
            if p.grad is not None and (first_rank or getattr(p, "tensor_model_parallel", False))
        ]
        squares = torch.stack(torch._foreach_norm(grads)).square().sum() if grads else torch.zeros(())
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(squares, group=self.tp_group)
        return squares.sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        masters = self.masters
        if self.model_params is not None:  # this step's gradients, in fp32
            for master, param in zip(masters, self.model_params):
                master.grad = None if param.grad is None else param.grad.float()
        try:
            norm = self.grad_norm()
            self._global_grad_norm = norm.item()  # the step's one host sync, as ZeRO's overflow check
            self.overflow = not math.isfinite(self._global_grad_norm)
            if self.overflow:
                return None
            grads = [p.grad for p in masters if p.grad is not None]
            if self.clip and self._global_grad_norm > self.clip:
                torch._foreach_mul_(grads, self.clip / (self._global_grad_norm + 1e-6))
            result = super().step(closure)
            if self.model_params is not None:
                torch._foreach_copy_(self.model_params, masters)
            return result
        finally:
            if self.model_params is not None:
                for master in masters:
                    master.grad = None

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.model_params is not None:
            state["master_weights"] = [m.detach() for m in self.masters]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        if (saved is None) != (self.model_params is None):
            found, kept = ("without", "keeps") if saved is None else ("with", "does not keep")
            raise ValueError(
                f"optimizer state {found} fp32 master weights, for an optimizer that {kept} them "
                "(resumed in another precision?)"
            )
        super().load_state_dict(state_dict)
        if saved is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.masters, saved)
                torch._foreach_copy_(self.model_params, self.masters)


def _master_copy(param: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of `param` to step, carrying its tensor-parallel attributes."""
    master = param.detach().float().clone().requires_grad_(True)
    for attribute in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, attribute):
            setattr(master, attribute, getattr(param, attribute))
    return master


def client_optimizer(module: torch.nn.Module, cfg: TrainConfig, tp_group=None) -> GuardedAdamW | None:
    """The optimizer the trainer hands DeepSpeed where DeepSpeed steps it as it is: ZeRO stage 0,
    with fp32 master weights when the run trains in bf16 (build it before the model is cast).
    None elsewhere (DeepSpeed builds AdamW from `deepspeed_config`)."""
    o = cfg.optim
    if not steps_bare(cfg):
        return None
    return GuardedAdamW(
        param_groups(module, o.weight_decay, named=True),
        clip=o.grad_clip,
        tp_group=tp_group,
        master_weights=cfg.parallel.precision != "fp32",
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=True,
    )


def steps_bare(cfg: TrainConfig) -> bool:
    """Whether DeepSpeed steps the torch optimizer it is given as it is: ZeRO stage 0 (fp32 or
    bf16, `check_config`)."""
    return cfg.parallel.zero_stage == 0


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
    if steps_bare(cfg):  # the trainer's GuardedAdamW (client_optimizer) clips, guards, keeps
        # the fp32 master weights and steps; the engine itself runs the model as it is cast
        del config["optimizer"]
        config["gradient_clipping"] = 0.0
        return config
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

"""An exponential moving average of the trained weights (`optim.ema_decay`), as diffusers'
`EMAModel` keeps it (its default schedule: no `update_after_step`, no warm-up power):

    shadow <- shadow - (1 - d_n) (shadow - param)  after the n-th applied optimizer step,
    d_n = min(ema_decay, (1 + m) / (10 + m)) with m = n - 1 (d_1 = 0: the first update copies)

Each rank keeps the average of the parameters its module holds (its tensor-parallel shard, in
fp32; under ZeRO-1/2 every data-parallel rank holds them whole, so the copies agree). The
trainer saves it beside the engine as a stateful part (`pretrain.checkpoint.PARTS`) and an exact
resume continues it; `cogvideo-convert zero` exports it as the model's weights.
"""

from __future__ import annotations

import torch
from torch import nn

from cogvideo import parallel
from cogvideo.checkpoint.io import CheckpointError
from cogvideo.checkpoint.training import EMA_PREFIX as PREFIX


class EMA:
    def __init__(self, modules: dict[str, nn.Module], decay: float):
        """`modules`: {name prefix: module} (the optimised parts of one model, "" for the whole)."""
        self.decay = decay
        self.updates = 0
        self.tp_rank = parallel.tp_rank() if parallel.is_initialized() else 0
        self.params = {
            prefix + name: param
            for prefix, module in modules.items()
            for name, param in module.named_parameters()
            if param.requires_grad
        }
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    def current_decay(self) -> float:
        """d_n of the update about to be made (diffusers' `EMAModel.get_decay`)."""
        step = self.updates  # diffusers: optimization_step - 1, its counter already advanced
        return 0.0 if step <= 0 else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self) -> None:
        """After an applied optimizer step."""
        keep = self.current_decay()
        for name, param in self.params.items():
            shadow = self.shadow[name]
            shadow.sub_((1 - keep) * (shadow - param.detach().float()))
        self.updates += 1

    def state_dict(self) -> dict:
        """The averages (this rank's TP shards, `tp_rank` saying which) and the update count."""
        head = {"decay": self.decay, "updates": self.updates, "tp_rank": self.tp_rank}
        return head | {PREFIX + n: t for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        names = {k[len(PREFIX) :] for k in state if k.startswith(PREFIX)}
        if names != set(self.shadow):
            raise CheckpointError(
                f"the average of the weights (EMA): holds {len(names)} tensors, this model trains {len(self.shadow)} "
                f"(differing: {sorted(names ^ set(self.shadow))[:3]})"
            )
        for name in names:
            self.shadow[name].copy_(state[PREFIX + name])
        self.updates = int(state["updates"])

"""Tolerances for comparing training runs that differ only in rounding (reduction order across
TP/DP ranks, fused vs unfused kernels), derived from bounds rather than tuned to one machine.

Losses: a forward pass is a chain of reductions; changing their order changes each result by a
few ulps (fp32 eps = 1.2e-7) per layer, and the trained weights feed that difference forward.
64 ulps per layer (plus embedding and head) bounds what reordering does to a loss, while a real
error (a wrong shard, a missed all-reduce) changes the loss by orders of magnitude more.

Weights after Adam steps: Adam moves each element by at most ~lr per step (|m_hat / sqrt(v_hat)|
<= ~1.2 for betas (0.9, 0.95), by Cauchy-Schwarz over the moment sums), whatever the gradient's
size. Rounding noise therefore matters only for elements whose gradient is itself near noise
(e.g. key biases, whose gradient is zero in exact arithmetic): there the two runs' updates
differ by a fraction of a step. 5 % of the largest lr bounds that for a few steps (seen: up to
0.7 % on some machines), while a real error moves many elements by whole steps (~lr).
"""

import torch

FP32_EPS = torch.finfo(torch.float32).eps


def loss_rel_tol(num_layers: int) -> float:
    return 64 * FP32_EPS * (num_layers + 2)


def adam_weight_atol(lr: float) -> float:
    return 0.05 * lr

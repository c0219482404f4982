"""`scaled_dot_product_attention` as every family calls it: in the inputs' precision, or computed
in fp32 from bf16/fp16 inputs where the run chose that.

On some CPUs the bf16 kernel's backward is several times slower than the fp32 kernel's: on the
dev AMD EPYC (AVX-512 BF16, no AMX) forward + backward at the small preset's attention shapes took
0.92 / 4.54 / 3.50 ms in bf16 and 0.19 / 2.09 / 1.78 ms computed in fp32 from the same bf16
inputs, and the demo's bf16 training steps took 26-29 % less time (stage 1 0.317 -> 0.231 s,
its own probe on one thread). Which is faster depends on the machine (bf16 matrix units, CUDA's
fused kernels), so a run measures it: the training step probe times the low precision's step
both ways (`parallel.attention_precision: auto`, cogvideo.precision) and the trainer steps inside

    with fp32_attention(choice.fp32_attention):
        loss = family.loss(...)
        engine.backward(loss)

Computing in fp32 is at least as accurate (the fused kernels accumulate the softmax in fp32
either way); the output and the inputs' gradients come back in the inputs' dtype. Outside such a
block, and for fp32 inputs, `sdpa` is `F.scaled_dot_product_attention`. The choice is taken in
the forward; activation checkpointing recomputes inside `backward`, so the block covers both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

_IN_FP32: ContextVar[bool] = ContextVar("fp32_attention", default=False)
LOW_PRECISION = (torch.bfloat16, torch.float16)


@contextmanager
def fp32_attention(enabled: bool = True) -> Iterator[None]:
    """Within the block, `sdpa` computes bf16/fp16 attention in fp32 (`enabled`), or in the
    inputs' dtype (not `enabled`)."""
    token = _IN_FP32.set(enabled)
    try:
        yield
    finally:
        _IN_FP32.reset(token)


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)`, in fp32 inside an enabled
    `fp32_attention` block when q is bf16/fp16 (a bool mask stays bool, an additive one is cast)."""
    if not (_IN_FP32.get() and q.dtype in LOW_PRECISION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.float()
    out = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p
    )
    return out.to(q.dtype)

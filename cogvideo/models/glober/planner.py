"""GLOBER's planner model (`cogvideo-plan`): the activations a training step keeps, measured as
autograd's saved tensors of the phase's real loss run on the meta device (no memory), and the
DiT's tensor-parallel traffic.

Activations are measured at batch 1 in the run's precision and scale with the batch, with
attention as a fused kernel keeps it (flash attention: q, k, v, the output, the log-sum-exp and
any mask; the meta device would run the math path, which keeps the N x N probabilities). Under TP
(phase generator) a saved tensor whose last dimension is the DiT's width (the residual stream,
layer-norm inputs, adaLN vectors) stays whole on every rank; every other DiT tensor (QKV, heads,
the MLP's hidden) is split over the ranks, as megatron's column/row layers split them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F

from cogvideo.models.glober.config import GloberConfig
from cogvideo.models.glober.flops import config_key, meta_batch
from cogvideo.models.glober.losses import autoencoder_loss, generator_loss
from cogvideo.precision import torch_dtype


class _FusedAttention(torch.autograd.Function):
    """What a flash-attention kernel saves for backward (the output's values do not matter on meta)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(*(t for t in (mask, q, k, v, out, lse) if t is not None))
        return out


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    return _FusedAttention.apply(query, key, value, attn_mask)


@functools.lru_cache(maxsize=16)
def _saved(build: Callable, key: tuple, dtype: str) -> tuple[float, float]:
    """(bytes that stay whole under TP, bytes that split) autograd saves for one sample's step."""
    cfg = GloberConfig(*key)
    with torch.device("meta"):
        model = build(cfg).to(torch_dtype(dtype)).train()
    batch = {k: v.to(torch_dtype(dtype)) if v.is_floating_point() else v for k, v in meta_batch(cfg).items()}
    whole, split = 0.0, 0.0
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        nonlocal whole, split
        base = t._base if t._base is not None else t  # views of one tensor count once
        if id(base) in seen:
            return t
        seen.add(id(base))
        size = base.numel() * base.element_size()
        if cfg.phase == "generator" and _splits(cfg, base):
            split += size
        else:
            whole += size
        return t

    attention = mock.patch.object(F, "scaled_dot_product_attention", fused_attention)
    with (
        torch.random.fork_rng(devices=[]),
        attention,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        if cfg.phase == "generator":
            generator_loss(cfg, model.autoencoder, model.dit, batch)
        else:
            autoencoder_loss(cfg, model.autoencoder, model.discriminator, batch)
    return whole, split


def _splits(cfg: GloberConfig, t: torch.Tensor) -> bool:
    h, heads = cfg.dit.hidden_size, cfg.dit.num_heads
    if t.dim() == 4 and t.shape[1] == heads:  # [B, heads, N, d]: q, k, v, attention output
        return True
    return t.dim() == 3 and t.shape[-1] in (3 * h, cfg.dit.mlp_ratio * h)


def make_planner(build: Callable):
    """The planner functions for the family whose plain-model builder is `build`."""

    def activation_bytes(cfg: GloberConfig, batch: int, tp: int, dtype: str, act_ckpt: bool) -> float:
        if act_ckpt and cfg.phase == "generator":  # each block keeps its input; one recomputes whole
            return batch * (_stream(cfg, dtype) * cfg.dit.depth + layer_activation_bytes(cfg, 1, tp, dtype))
        whole, split = _saved(build, config_key(cfg.replace(activation_checkpointing=act_ckpt)), dtype)
        return batch * (whole + split / tp)

    def layer_activation_bytes(cfg: GloberConfig, batch: int, tp: int, dtype: str) -> float:
        """One DiT block's share (phase generator); phase autoencoder: all of it (conservative)."""
        whole, split = _saved(build, config_key(cfg.replace(activation_checkpointing=False)), dtype)
        if cfg.phase != "generator":
            return batch * (whole + split)
        return batch * (whole / cfg.dit.depth + split / cfg.dit.depth / tp)

    return activation_bytes, layer_activation_bytes


def _stream(cfg: GloberConfig, dtype: str) -> float:
    return cfg.seq_length * cfg.dit.hidden_size * torch_dtype(dtype).itemsize


def logits_bytes(cfg: GloberConfig, batch: int, tp: int, dtype: str) -> float:
    return 0.0  # a diffusion model regresses; no vocabulary logits


def tp_allreduces(cfg: GloberConfig, act_ckpt: bool) -> tuple[int, int]:
    """The DiT's row-parallel outputs (attention, MLP) in forward and column inputs in backward
    (again in the recomputed forward), plus the caption embedding's forward and backward."""
    if cfg.phase != "generator":
        return 0, 0
    return cfg.dit.depth * 2 * (3 if act_ckpt else 2) + 2, cfg.seq_length * cfg.dit.hidden_size


def describe(cfg: GloberConfig) -> str:
    c, latent, g = cfg.vae.latent_channels, cfg.latent_size, cfg.global_size
    widths = "x".join(str(cfg.decoder.channels * m) for m in cfg.decoder.channel_mult)
    return (
        f"{cfg.name} (phase {cfg.phase}): {cfg.frame_size}px frames -> latents {c}x{latent}x{latent} -> "
        f"global {cfg.encoder.out_channels}x{g}x{g}; UNet {widths}; DiT {cfg.dit.depth} x {cfg.dit.hidden_size}"
    )

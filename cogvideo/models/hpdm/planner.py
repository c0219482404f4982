"""HPDM's analytic FLOPs and activation memory: the trainer's MFU, `cogvideo-plan`'s planner model.

FLOPs count multiply-adds of the matrix products (2 FLOPs each) of one training example, a patch
per level, each level through the blocks its table names (adaptive computation): per block the
context fusion (finer levels), the interface self-attention (`interface_attention`), the read cross-attention (latents x interface tokens), the latent
feed-forwards and self-attention layers, the write cross-attention and the interface
feed-forward; plus the tokenizer and head (and `output_conv`'s convolution). Every weight trains, and attention products have two
activation inputs, so backward is twice forward.

Memory counts the tensors autograd keeps for backward in cogvideo/models/hpdm/model.py, per
(block, level) pair that runs: the inputs of every linear layer (their output where the next op
saves it instead), LayerNorm inputs and statistics, the attention inputs, outputs and
log-sum-exp, the GELU inputs; held against autograd's own saved tensors by
tests/test_hpdm_family.py.
"""

from __future__ import annotations

import math

from cogvideo.family_spec import MatmulFlops
from cogvideo.models.hpdm.config import COORDINATES, HPDMConfig
from cogvideo.precision import torch_dtype

STATS_BYTES = 4  # LayerNorm mean / rstd and attention log-sum-exp stay fp32


def latent_tokens(cfg: HPDMConfig) -> int:
    return cfg.num_latents + (cfg.text_length if cfg.condition == "text" else 0)


def block_runs(cfg: HPDMConfig) -> list[tuple[int, int]]:
    """(block, level) pairs one training example runs."""
    return [(b, level) for b in range(cfg.num_layers) for level in cfg.levels_of_block(b)]


def matmuls(cfg: HPDMConfig) -> list[MatmulFlops]:
    N, M = cfg.tokens_per_patch, latent_tokens(cfg)
    di, dl, f, K = cfg.interface_dim, cfg.latent_dim, cfg.ffn_mult, cfg.latent_layers
    runs = block_runs(cfg)
    fused = sum(1 for b, level in runs if level > 1)
    count = len(runs)
    mixes = count if cfg.interface_attention else 0
    conv = cfg.num_levels if cfg.output_conv else 0
    return [
        MatmulFlops(
            "tokenizer + head",
            cfg.num_levels
            * 2
            * N
            * di
            * (cfg.pixels_per_token + 3 * math.prod(cfg.head_footprint) + COORDINATES),
            True,
        ),
        MatmulFlops("output convolution", conv * 2 * N * cfg.pixels_per_token * 3 * 9, True),
        MatmulFlops("context fusion", fused * 2 * N * 2 * di * di, True),
        MatmulFlops(
            "read / write projections",
            count * 2 * (2 * M * dl * di + 4 * N * di * di + 2 * M * dl * di),
            True,
        ),
        MatmulFlops("read / write attention", count * 2 * 2 * 2 * M * N * di, False, 2),
        MatmulFlops("interface self-attention projections", mixes * 2 * 4 * N * di * di, True),
        MatmulFlops("interface self-attention", mixes * 2 * 2 * N * N * di, False, 2),
        MatmulFlops("latent layers", count * 2 * M * dl * dl * ((1 + K) * 2 * f + 4 * K), True),
        MatmulFlops("latent attention", count * K * 2 * 2 * M * M * dl, False, 2),
        MatmulFlops("interface feed-forward", count * 2 * N * di * di * 2 * f, True),
    ]


def forward_flops(cfg: HPDMConfig, batch: int = 1) -> float:
    return batch * sum(m.forward for m in matmuls(cfg))


def train_flops(cfg: HPDMConfig, batch: int = 1) -> float:
    return batch * sum(m.forward + m.backward for m in matmuls(cfg))


def recompute_flops(cfg: HPDMConfig, batch: int = 1) -> float:
    """Activation checkpointing recomputes every block's forward once more."""
    if not cfg.activation_checkpointing:
        return 0.0
    return batch * sum(m.forward for m in matmuls(cfg) if m.name != "tokenizer + head")


def block_activation_bytes(
    cfg: HPDMConfig, batch: int, tp: int = 1, dtype: str = "fp32", fuses=False
) -> float:
    """What one block keeps for backward for one level's batch of patches."""
    e, s = torch_dtype(dtype).itemsize, STATS_BYTES
    N, M = cfg.tokens_per_patch, latent_tokens(cfg)
    di, dl, K = cfg.interface_dim, cfg.latent_dim, cfg.latent_layers
    dit, dlt, fi, fl = di / tp, dl / tp, cfg.ffn_mult * di / tp, cfg.ffn_mult * dl / tp
    heads_i, heads_l = dit / cfg.head_dim, dlt / cfg.head_dim

    def norm(rows, dim):  # input + fp32 statistics
        return rows * dim * e + 2 * rows * s

    def modulated(rows, dim):  # input, statistics, the normalised value and the scale it meets
        return norm(rows, dim) + rows * dim * e

    def attention(q_rows, kv_rows, inner, heads):  # q, k, v, output, log-sum-exp; the out proj's input
        return (q_rows + 2 * kv_rows) * inner * e + 2 * q_rows * inner * e + q_rows * heads * s

    def feed_forward(rows, dim, hidden):  # fc1 input, GELU input, fc2 input
        return rows * dim * e + 2 * rows * hidden * e

    total = 2 * N * di * e if fuses else 0  # the concatenated fusion input
    if cfg.interface_attention:  # its norm, the qkv input, the attention
        total += norm(N, di) + N * di * e + attention(N, N, dit, heads_i)
    total += modulated(M, dl) + norm(N, di) + M * dl * e + N * di * e  # read norms; q, kv inputs
    total += attention(M, N, dit, heads_i) + modulated(M, dl) + feed_forward(M, dl, fl)
    total += K * (modulated(M, dl) + M * dl * e + attention(M, M, dlt, heads_l))
    total += K * (modulated(M, dl) + feed_forward(M, dl, fl))
    total += norm(N, di) + norm(M, dl) + N * di * e + M * dl * e  # write norms; q, kv inputs
    total += attention(N, M, dit, heads_i) + norm(N, di) + feed_forward(N, di, fi)
    return batch * total


def layer_activation_bytes(cfg: HPDMConfig, batch: int, tp: int = 1, dtype: str = "fp32") -> float:
    """The largest thing one checkpointed block recomputes: one block over every level it runs."""
    return max(
        sum(
            block_activation_bytes(cfg, batch, tp, dtype, fuses=level > 1) for level in cfg.levels_of_block(b)
        )
        for b in range(cfg.num_layers)
    )


def logits_bytes(cfg: HPDMConfig, batch: int, tp: int = 1, dtype: str = "fp32") -> float:
    """The head's output per level and the loss's fp32 terms (noisy, clean, denoised)."""
    pixels = cfg.num_levels * cfg.tokens_per_patch * cfg.pixels_per_token
    return batch * pixels * (torch_dtype(dtype).itemsize + 3 * 4)


def activation_bytes(cfg: HPDMConfig, batch: int, tp: int, dtype: str, act_ckpt: bool) -> float:
    runs = block_runs(cfg)
    interface = batch * cfg.tokens_per_patch * cfg.interface_dim * torch_dtype(dtype).itemsize
    if act_ckpt:  # each block keeps its inputs (interface and latents); one block recomputes
        latents = batch * latent_tokens(cfg) * cfg.latent_dim * torch_dtype(dtype).itemsize
        kept = len(runs) * (interface + latents) + layer_activation_bytes(cfg, batch, tp, dtype)
    else:
        kept = sum(block_activation_bytes(cfg, batch, tp, dtype, fuses=level > 1) for _, level in runs)
    head = cfg.num_levels * 2 * interface  # the head norm's input and the head's input
    if cfg.output_conv:  # the convolution's input: the head's pixels
        head += (
            cfg.num_levels * batch * cfg.tokens_per_patch * cfg.pixels_per_token * torch_dtype(dtype).itemsize
        )
    return kept + head + logits_bytes(cfg, batch, tp, dtype)


def tp_allreduces(cfg: HPDMConfig, act_ckpt: bool) -> tuple[int, int]:
    """(all-reduces of one step, elements of the largest per example): per (block, level) run the
    row-parallel outputs in forward (read, read feed-forward, each latent layer's attention and
    feed-forward, write, interface feed-forward: 4 + 2K), again in a recomputed forward, and the
    column-parallel inputs in backward (read q and kv, the feed-forwards' fc1, each latent
    layer's qkv, write q and kv: 6 + 2K), one more each with `interface_attention` (its out and
    qkv). Elements: an interface activation, the largest."""
    mix = 1 if cfg.interface_attention else 0
    forward, backward = 4 + 2 * cfg.latent_layers + mix, 6 + 2 * cfg.latent_layers + mix
    per_run = forward * (2 if act_ckpt else 1) + backward
    return len(block_runs(cfg)) * per_run, cfg.tokens_per_patch * cfg.interface_dim


def describe(cfg: HPDMConfig) -> str:
    return (
        f"{cfg.name}: {cfg.num_levels}-level pyramid of {'x'.join(map(str, cfg.patch))} patches up to "
        f"{'x'.join(map(str, cfg.video_size))}, {cfg.num_layers} RIN blocks (levels {cfg.block_levels}), "
        f"interface {cfg.tokens_per_patch} x {cfg.interface_dim}, latents {latent_tokens(cfg)} x {cfg.latent_dim}"
    )

"""DSR's planner model: analytic FLOPs (the trainer's MFU, `cogvideo-plan`, the benchmark's
roofline) and activation memory. FLOPs are counted as cogvideo/models/cogvideo/flops.py counts CogVideo's: multiply-adds of the matrix products, attention over the
cells the kernels compute (the rows before the high-res block densely; each high-res query its
`window_keys` window), backward = input gradient always + weight gradient where the weight trains."""

from __future__ import annotations

from cogvideo.family_spec import MatmulFlops, PlannerModel
from cogvideo.models.cogvideo.planner import STATS_BYTES
from cogvideo.models.dsr.config import DsrConfig
from cogvideo.models.dsr.local_attention import Tiling
from cogvideo.precision import torch_dtype


def matmuls(cfg: DsrConfig) -> list[MatmulFlops]:
    """Every matrix product of one forward pass over one sequence (logits: high-res rows only)."""
    h, f, V, layers = cfg.hidden_size, cfg.ffn_size, cfg.vocab.vocab_size, cfg.num_layers
    context, high = cfg.high_start, cfg.high_tokens
    backbone_trains = cfg.train_backbone
    return [
        MatmulFlops("backbone qkv + dense", layers * 2 * context * h * 4 * h, backbone_trains),
        MatmulFlops("backbone attention", layers * 4 * h * context * context, False, 2),
        MatmulFlops("high-res qkv + dense", layers * 2 * high * h * 4 * h, True),
        MatmulFlops("high-res local attention", layers * 4 * h * high * cfg.window_keys, False, 2),
        MatmulFlops("mlp", layers * 2 * cfg.seq_length * h * f * 2, backbone_trains),
        MatmulFlops("logits", 2 * high * h * V, backbone_trains),
    ]


def forward_flops(cfg: DsrConfig, batch: int = 1) -> float:
    return batch * sum(m.forward for m in matmuls(cfg))


def sampling_flops(cfg: DsrConfig, frames: int = 1) -> float:
    """One super-resolved frame's forward, its logits over the image ids only (as sampled)."""
    head = 2 * cfg.high_tokens * cfg.hidden_size * (cfg.vocab.vocab_size - cfg.vocab.num_image_tokens)
    return frames * (forward_flops(cfg) - head)


def train_flops(cfg: DsrConfig, batch: int = 1) -> float:
    return batch * sum(m.forward + m.backward for m in matmuls(cfg))


def recompute_flops(cfg: DsrConfig, batch: int = 1) -> float:
    """Activation checkpointing's extra forward: every layer once more (not the logits)."""
    if not cfg.activation_checkpointing:
        return 0.0
    return batch * sum(m.forward for m in matmuls(cfg) if m.name != "logits")


# ---- activations (what autograd saves for backward, each storage once; see tests/test_dsr_plan.py)
def layer_activation_bytes(cfg: DsrConfig, batch: int, tp: int = 1, dtype: str = "fp32") -> float:
    """Bytes one DsrLayer keeps for backward (local path). Frozen linear layers keep no input."""
    e, s = torch_dtype(dtype).itemsize, STATS_BYTES
    C, N, L = cfg.high_start, cfg.high_tokens, cfg.seq_length
    h, f, heads = cfg.hidden_size, cfg.ffn_size / tp, cfg.num_heads / tp
    ht, tiling = h / tp, Tiling(cfg)
    gathered, K = tiling.tiles * tiling.tile_keys, tiling.tile_keys  # tiles' keys; keys per query row
    total = 4 * L * h * e + 4 * 2 * L * s  # the four layer norms' inputs and statistics
    # input of the trainable high-res QKV: its rows of the first norm's output, a view of that
    # output for one sequence, a copy of the rows for more (the batch's slices are not contiguous)
    total += (L if batch == 1 else N) * h * e
    total += 3 * C * ht * e + C * ht * e + C * heads * s  # backbone attention: q, k, v, output, lse
    total += C * C * s  # its mask, as SDPA keeps it on the CPU (float, [B, 1, C, C])
    # local attention (blocked): the scaled queries in tile order, each tile's gathered keys and
    # values, the probabilities over them (fp32, and cast), the tiles' mask (bool, shared by the batch)
    total += N * ht * e + 2 * gathered * ht * e
    total += N * heads * K * s + (N * heads * K * e if e != s else 0)
    total += N * K / batch
    total += N * ht * e  # input of the high-res output projection
    total += L * f * e  # GELU input
    if cfg.train_backbone:
        total += C * ht * e + L * h * e + L * f * e  # inputs of attention.dense and both MLP linears
    return batch * total


def logits_bytes(cfg: DsrConfig, batch: int, tp: int = 1, dtype: str = "fp32") -> float:
    """The high-res rows' logits (then their gradient) and the fp32 softmax the loss keeps: over the
    image ids at TP=1, over this rank's vocabulary shard under TP."""
    e, V = torch_dtype(dtype).itemsize, cfg.vocab.vocab_size / tp
    kept = cfg.vocab.num_image_tokens if tp == 1 else V
    return batch * cfg.high_tokens * (V * e + kept * STATS_BYTES)


def activation_bytes(cfg: DsrConfig, batch: int, tp: int, dtype: str, act_ckpt: bool) -> float:
    """Peak activation memory of one micro-batch on one GPU (at the start of backward)."""
    layer = layer_activation_bytes(cfg, batch, tp, dtype)
    hidden = batch * cfg.seq_length * cfg.hidden_size * torch_dtype(dtype).itemsize
    head = batch * cfg.high_tokens * cfg.hidden_size * torch_dtype(dtype).itemsize
    final = hidden + (head if cfg.train_backbone else 0)  # the final norm's input (and output)
    kept = cfg.num_layers * hidden + layer if act_ckpt else cfg.num_layers * layer
    return kept + final + logits_bytes(cfg, batch, tp, dtype)


def tp_allreduces(cfg: DsrConfig, act_ckpt: bool) -> tuple[int, int]:
    """(all-reduces of one training step under TP, elements of each per sequence), counted in
    sequence-sized units: the two attentions' row-parallel outputs cover the sequence once
    between them, the MLP's once, forward (again when recomputed) and their inputs backward;
    plus the embedding's and the loss's."""
    return cfg.num_layers * 2 * (3 if act_ckpt else 2) + 2, cfg.seq_length * cfg.hidden_size


def describe(cfg: DsrConfig) -> str:
    return (
        f"{cfg.name} (dsr): {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, sequence "
        f"{cfg.seq_length} = {cfg.text_length} text + {cfg.frame_tokens}^2 low-res + {cfg.high_frame_tokens}^2 "
        f"high-res, windows {cfg.high_window_rows}x{cfg.high_window_cols} + {cfg.low_window}x{cfg.low_window}"
    )


PLANNER = PlannerModel(
    describe=describe,
    activation_bytes=activation_bytes,
    layer_activation_bytes=layer_activation_bytes,
    logits_bytes=logits_bytes,
    recompute_flops=recompute_flops,
    tp_allreduces=tp_allreduces,
)

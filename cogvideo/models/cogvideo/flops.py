"""Analytic FLOPs of one CogVideo sequence, shared by the planner and the trainer's MFU log.

A multiply-add counts 2 FLOPs; only matrix products are counted (norms, softmax, the gate
mix and embedding lookups are a fraction of a percent). Attention is counted over the
blocks the attention kernels compute (cogvideo/models/cogvideo/model.py), masked cells included, as MFU
conventions do for causal attention:

- spatial channel: text queries x text keys (a bidirectional block, as released); each frame's
  queries x (text + own frame);
- temporal channel, stage 1: frame queries x the whole sequence (causal over everything);
- temporal channel, stage 2: frame queries x (text + their 3D window: w x w positions x all
  frames); text queries use the spatial channel only.

Backward: activation gradients flow through every layer, frozen ones included (the trainable
temporal channel and frame position table sit in every layer and below it), so each matrix
product costs its forward FLOPs once more for the input gradient, and once more again for the
weight gradient only when that weight trains. Attention products have two activation inputs:
backward = 2 x forward. Activation checkpointing recomputes each layer's forward; that is
hardware work, not model work, and is reported separately (:func:`recompute_flops`).
"""

from __future__ import annotations

from cogvideo.family_spec import MatmulFlops
from cogvideo.models.cogvideo.config import ModelConfig


def attention_pairs(cfg: ModelConfig) -> tuple[int, int]:
    """(spatial, temporal) query-key pairs one layer computes for a full sequence."""
    T, n, nf = cfg.text_length, cfg.tokens_per_frame, cfg.num_frames
    spatial = T * T + nf * n * (T + n)
    if not cfg.has_temporal:
        return spatial, 0
    if cfg.stage == "stage1":
        return spatial, nf * n * cfg.seq_length
    return spatial, nf * n * (T + nf * cfg.window_size**2)


def matmuls(cfg: ModelConfig) -> list[MatmulFlops]:
    """Every matrix product of one forward pass over one full sequence, grouped by role."""
    L, h, f, V = cfg.seq_length, cfg.hidden_size, cfg.ffn_size, cfg.vocab.vocab_size
    layers = cfg.num_layers
    backbone_trains = cfg.train_backbone or not cfg.has_temporal
    spatial_pairs, temporal_pairs = attention_pairs(cfg)
    groups = [
        MatmulFlops("spatial qkv + dense", layers * 2 * L * h * 4 * h, backbone_trains),
        MatmulFlops("spatial attention", layers * 4 * h * spatial_pairs, False, 2),
        MatmulFlops("mlp", layers * 2 * L * h * f * 2, backbone_trains),
        MatmulFlops("logits", 2 * L * h * V, backbone_trains),
    ]
    if cfg.has_temporal:
        groups[2:2] = [
            MatmulFlops("temporal qkv + dense", layers * 2 * L * h * 4 * h, True),
            MatmulFlops("temporal attention", layers * 4 * h * temporal_pairs, False, 2),
        ]
    return groups


def forward_flops(cfg: ModelConfig, batch: int = 1) -> float:
    return batch * sum(m.forward for m in matmuls(cfg))


def train_flops(cfg: ModelConfig, batch: int = 1) -> float:
    """Forward + backward model FLOPs of one training step on `batch` sequences (for MFU)."""
    return batch * sum(m.forward + m.backward for m in matmuls(cfg))


def recompute_flops(cfg: ModelConfig, batch: int = 1) -> float:
    """Extra forward work of activation checkpointing (every layer once more, not the logits)."""
    if not cfg.activation_checkpointing:
        return 0.0
    return batch * sum(m.forward for m in matmuls(cfg) if m.name != "logits")

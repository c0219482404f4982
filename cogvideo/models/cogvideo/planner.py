"""The activations one CogVideo training step keeps on a GPU, and its tensor-parallel
all-reduces: with :mod:`cogvideo.models.cogvideo.flops`, the family's planner model (`cogvideo-plan`).

Sizes are bytes for `batch` sequences on one of `tp` ranks in precision `dtype` (a name of
:mod:`cogvideo.precision`); the tensors counted are the ones autograd saves for the backward
pass of cogvideo/models/cogvideo/model.py (blocked attention path, full sequence), each storage once
(tests/test_plan_memory.py compares them with autograd's saved tensors).
"""

from __future__ import annotations

from cogvideo.models.cogvideo.config import ModelConfig
from cogvideo.precision import torch_dtype

STATS_BYTES = 4  # layer-norm mean/rstd and attention log-sum-exp stay fp32


def layer_activation_bytes(cfg: ModelConfig, batch: int, tp: int = 1, dtype: str = "fp32") -> float:
    """Bytes one TransformerLayer keeps for backward. Frozen linear layers keep no input (torch's
    and megatron's parallel ones alike)."""
    e, s = torch_dtype(dtype).itemsize, STATS_BYTES
    T, n, nf, L = cfg.text_length, cfg.tokens_per_frame, cfg.num_frames, cfg.seq_length
    h, f, heads = cfg.hidden_size, cfg.ffn_size / tp, cfg.num_heads / tp
    ht, F = h / tp, nf * n  # this rank's hidden slice; frame tokens
    backbone_trains = cfg.train_backbone or not cfg.has_temporal
    temporal = cfg.has_temporal

    total = 4 * L * h * e + 4 * 2 * L * s  # the four layer norms' inputs and statistics
    total += 3 * L * ht * e  # spatial QKV output (text q, k, v are views of it)
    total += T * ht * e + T * heads * s + T * T * e  # text block: output, lse, mask
    # frame blocks: q regrouped per frame (a view when one sample or one frame), text + frame
    # k and v, output, lse, mask
    total += F * ht * e * (batch > 1 and nf > 1) + 2 * nf * (T + n) * ht * e
    total += F * ht * e + F * heads * s + F * (T + n) * e
    total += 8 * nf * (T + n) / batch  # int64 index of each frame's text + frame keys
    total += L * f * e  # GELU input
    if backbone_trains or temporal:
        total += L * h * e  # first norm's output, input of a trainable QKV
    if backbone_trains:
        total += L * ht * e + L * h * e + L * f * e  # inputs of attention.dense and both MLP linears
    if temporal:
        total += L * ht * e  # input of the temporal dense
        total += F * ht * e + F * heads * s  # output, lse
        if cfg.stage == "stage1":
            total += 3 * L * ht * e + F * L * e  # QKV output (q, k, v are views of it), mask
        else:
            per = nf * cfg.window_size**2  # tokens of one 3D window
            windows = n // cfg.window_size**2
            total += F * ht * e + 2 * windows * (T + per) * ht * e  # gathered q, text + window k, v
            total += (
                8 * (2 * F + windows * (T + per)) / batch
            )  # int64 indices: window order, its inverse, keys
            total += windows * per * (T + per) * e  # mask
        total += 2 * L * h * e + 2 * h * e  # the gate mix keeps both channel outputs and a, 1 - a
    return batch * total


def logits_bytes(cfg: ModelConfig, batch: int, tp: int = 1, dtype: str = "fp32") -> float:
    """The output layer at the end of forward / start of backward: the logits (then their
    gradient, same size) and the fp32 softmax the loss keeps: over the image ids at TP=1,
    over this rank's whole vocabulary shard under TP (megatron's vocab-parallel loss)."""
    e, L, V = torch_dtype(dtype).itemsize, cfg.seq_length, cfg.vocab.vocab_size / tp
    kept = cfg.vocab.num_image_tokens if tp == 1 else V
    return batch * L * (V * e + kept * STATS_BYTES)


def activation_bytes(cfg: ModelConfig, batch: int, tp: int, dtype: str, act_ckpt: bool) -> float:
    """Peak activation memory of one micro-batch on one GPU (at the start of backward)."""
    layer = layer_activation_bytes(cfg, batch, tp, dtype)
    hidden = batch * cfg.seq_length * cfg.hidden_size * torch_dtype(dtype).itemsize
    # the final norm's input (and its output, when the tied output layer trains)
    final = hidden * (2 if cfg.train_backbone or not cfg.has_temporal else 1)
    if act_ckpt:  # every layer keeps its input; the one being recomputed keeps everything
        kept = cfg.num_layers * hidden + layer
    else:
        kept = cfg.num_layers * layer
    return kept + final + logits_bytes(cfg, batch, tp, dtype)


def tp_allreduces(cfg: ModelConfig, act_ckpt: bool) -> tuple[int, int]:
    """(all-reduces of one training step under TP, elements of each per sequence): the
    row-parallel outputs (spatial, temporal, MLP) in forward and the column inputs in backward,
    again in the recomputed forward, plus the embedding's and the loss's."""
    per_layer = (3 if cfg.has_temporal else 2) * (3 if act_ckpt else 2)
    return cfg.num_layers * per_layer + 2, cfg.seq_length * cfg.hidden_size


def describe(cfg: ModelConfig) -> str:
    return (
        f"{cfg.name} ({cfg.stage}): {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"sequence {cfg.seq_length} = {cfg.text_length} text + {cfg.num_frames} x {cfg.tokens_per_frame}"
    )

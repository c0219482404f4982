"""The CogVideo model: CogView2's Sandwich-LN transformer with a second (temporal) attention
channel in every layer.

Built plain (full shapes, torch layers); `TP_PLAN` says how it shards and `init_weights` how
each full parameter starts. `cogvideo.family.build_model` builds it on the meta device,
parallelizes it by the plan (megatron-core layers, activation checkpointing), then allocates
this rank's shards and initialises them. Registered as the "cogvideo" family in
cogvideo/models/cogvideo/__init__.py.

Three attention paths share one visibility rule (cogvideo/models/cogvideo/sequence.py):

- blocked (default): text, per-frame spatial blocks and per-window temporal blocks gathered
  into the batch dimension;
- dense (reference, `model.dense_attention = True`): one explicit L x L mask per channel;
- cached (`forward_chunk`): incremental decoding over a KV cache, with dense masks over the
  cached keys; a chunk of whole frames right after the text (the sampler's given frames) runs
  blocked like the full forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cogvideo.models.cogvideo import blocked
from cogvideo.models.cogvideo.attention import attend, kernel_mask
from cogvideo.models.cogvideo.blocked import (
    FrameBlocks,
    attention_shifts,
    frame_blocks,
    text_bias_scores,
    with_pads,
)
from cogvideo.models.cogvideo.config import ModelConfig
from cogvideo.models.cogvideo.kv_cache import ChunkPlan, KVCache
from cogvideo.models.cogvideo.sequence import TEXT, TokenMeta, layer_shift, position_ids, visible
from cogvideo.tp_plan import Column, Row, TiedEmbedding, TPPlan, Vocab, vocab_cross_entropy

TEMPORAL_PARAMS = ("frame_position_embeddings.", ".temporal_attention.", ".temporal_gate")

TP_PLAN = TPPlan(
    {
        "word_embeddings": Vocab(),  # also the tied output layer: vocabulary-parallel logits
        "attention.query_key_value": Column(stride=3),  # [Q; K; V] -> [Q_r; K_r; V_r] on rank r
        "attention.dense": Row(),
        "temporal_attention.query_key_value": Column(stride=3),
        "temporal_attention.dense": Row(),
        "mlp.dense_h_to_4h": Column(),
        "mlp.dense_4h_to_h": Row(),
    },
    blocks="layers",
)  # norms, gates and position tables are replicated


def is_backbone_param(name: str) -> bool:
    """CogView2's own parameters (frozen in video training unless cfg.train_backbone)."""
    return not any(part in name or name.startswith(part) for part in TEMPORAL_PARAMS)


OUTPUT_PROJECTIONS = ("attention.dense", "mlp.dense_4h_to_h")  # std / sqrt(2 * num_layers)


def init_weights(cfg: ModelConfig, name: str, tensor: torch.Tensor) -> None:
    """The published initialisation of parameter `name`, drawn into its full tensor in place:
    normal(init_std) for embeddings and input projections, init_std / sqrt(2 * num_layers) for the
    output projections (both attention channels and the MLP), zeros for biases and the temporal
    gate, LayerNorm ones / zeros."""
    module, _, kind = name.rpartition(".")
    if kind == "weight" and module.endswith("layernorm"):
        nn.init.ones_(tensor)
    elif kind in ("bias", "temporal_gate"):
        nn.init.zeros_(tensor)
    elif kind == "weight" and module.endswith(OUTPUT_PROJECTIONS):
        nn.init.normal_(tensor, std=cfg.init_std / math.sqrt(2 * cfg.num_layers))
    elif kind == "weight" and module.endswith(("embeddings", "query_key_value", "dense_h_to_4h")):
        nn.init.normal_(tensor, std=cfg.init_std)
    else:
        raise ValueError(
            f"cogvideo.models.cogvideo.model.init_weights: no initialisation for parameter {name}"
        )


class Attention(nn.Module):
    """One attention channel's QKV ([Q; K; V]) and output projection. The head count is read
    from the QKV output, so the same code runs on a TP rank's share of the heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def qkv(self, x: torch.Tensor):
        """x [B, L, hidden] -> q, k, v each [B, heads, L, d]."""
        B, L, _ = x.shape
        q, k, v = self.query_key_value(x).view(B, L, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def project(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx [B, heads, L, d] -> [B, L, hidden]."""
        B, heads, L, _ = ctx.shape
        return self.dense(ctx.transpose(1, 2).reshape(B, L, heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


@dataclass
class Masks:
    """What every layer of one forward or chunk attends with, built once (bool, True = attend).
    Blocked: `text` (the text queries of a full forward) and `frames` (whole frames after the
    text); dense: `dense[channel, shift]` over all queries and keys, plus `dense_bias[channel]`."""

    is_frame: torch.Tensor  # [l] queries that mix in the temporal channel
    text: torch.Tensor | None = None  # [B, 1, T, T]
    frames: FrameBlocks | None = None
    dense: dict = field(default_factory=dict)
    dense_bias: dict = field(default_factory=dict)

    def add_dense(
        self,
        cfg: ModelConfig,
        channel: str,
        queries: TokenMeta,
        query_pad: torch.Tensor,
        keys: TokenMeta,
        key_pad: torch.Tensor,
        text_bias: float,
    ) -> None:
        shifts = attention_shifts(cfg) if channel == "temporal" else {0}
        for shift in shifts:
            vis = visible(cfg, queries, keys, channel, shift).to(query_pad.device)
            self.dense[channel, shift] = with_pads(vis, key_pad, query_pad)
        bias = text_bias_scores(vis, queries, keys, text_bias)
        if bias is not None:
            self.dense_bias[channel] = bias

    def for_kernel(self, dtype: torch.dtype, pb_relax_alpha: float) -> None:
        """Every mask (and text bias) as the attention kernel adds it, in the activations' dtype,
        once for all layers (cogvideo.models.cogvideo.attention.kernel_mask)."""
        if self.text is not None:
            self.text, _ = kernel_mask(self.text, None, dtype, pb_relax_alpha)
        if self.frames is not None:
            self.frames.for_kernel(dtype, pb_relax_alpha)
        kernel = {
            key: kernel_mask(mask, self.dense_bias.get(key[0]), dtype, pb_relax_alpha)
            for key, mask in self.dense.items()
        }
        self.dense = {key: mask for key, (mask, _) in kernel.items()}
        self.dense_bias = {key[0]: bias for key, (_, bias) in kernel.items() if bias is not None}


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        hidden_size, eps = cfg.hidden_size, cfg.layernorm_epsilon
        self.cfg, self.index, self.shift = cfg, index, layer_shift(cfg, index)
        self.input_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.attention = Attention(cfg)
        self.third_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = MLP(cfg)
        self.fourth_layernorm = nn.LayerNorm(hidden_size, eps=eps)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)
        if cfg.has_temporal:
            self.temporal_attention = Attention(cfg)
            self.temporal_gate = nn.Parameter(torch.zeros(hidden_size))

    def _mix(self, spatial_out: torch.Tensor, temporal_out: torch.Tensor, is_frame: torch.Tensor):
        """Frame tokens: sigmoid(p) * spatial + (1 - sigmoid(p)) * temporal; text: spatial."""
        a = torch.sigmoid(self.temporal_gate)
        mixed = a * spatial_out + (1 - a) * temporal_out
        return torch.where(is_frame[None, :, None], mixed, spatial_out)

    def _finish(self, h, attn_out):
        """Sandwich LN; SAT's hidden dropout sits on each branch before its closing norm."""
        h = h + self.third_layernorm(self.hidden_dropout(attn_out))
        return h + self.fourth_layernorm(self.hidden_dropout(self.mlp(self.post_attention_layernorm(h))))

    # ---- one layer, full sequence or cached chunk -------------------------------------
    def forward(self, h: torch.Tensor, masks: Masks, temporal: bool, dense: bool):
        """Full sequence; `dense`: the explicit-mask reference path."""
        temporal = temporal and self.cfg.has_temporal and h.shape[1] > self.cfg.text_length
        return self._attend_and_mlp(h, masks, temporal, dense)

    def forward_chunk(self, h, cache: KVCache, plan: ChunkPlan, masks: Masks):
        """A chunk after what `cache` holds: blocked for whole frames right after the text."""
        return self._attend_and_mlp(h, masks, cache.temporal is not None, masks.frames is None, cache, plan)

    def _attend_and_mlp(
        self,
        h,
        masks: Masks,
        temporal: bool,
        dense: bool,
        cache: KVCache | None = None,
        plan: ChunkPlan | None = None,
    ):
        alpha = self.cfg.pb_relax_alpha  # PB-Relax (fp16 without fused kernels)
        x = self.input_layernorm(h)
        drop = self.cfg.attention_dropout if self.training else 0.0
        q, k, v = self.attention.qkv(x)
        if cache is not None:
            k, v = cache.spatial_kv(self.index, plan, k, v)
        if dense:
            ctx = attend(q, k, v, masks.dense["spatial", 0], masks.dense_bias.get("spatial"), alpha, drop)
        else:
            ctx = self._spatial_blocked(q, k, v, masks, alpha, drop)
        out = self.attention.project(ctx)
        if temporal:
            tq, tk, tv = self.temporal_attention.qkv(x)
            if cache is not None:
                tk, tv = cache.temporal_kv(self.index, plan, tk, tv)
            shift = self.shift if self.cfg.stage == "stage2" else 0
            if dense:
                tctx = attend(
                    tq, tk, tv, masks.dense["temporal", shift], masks.dense_bias.get("temporal"), alpha, drop
                )
            else:
                tctx = self._temporal_blocked(tq, tk, tv, masks, shift, alpha, drop)
            out = self._mix(out, self.temporal_attention.project(tctx), masks.is_frame)
        return self._finish(h, out)

    def _spatial_blocked(self, q, k, v, masks: Masks, alpha: float, drop: float):
        if masks.text is None:  # a chunk of whole frames: no text queries
            return blocked.spatial_attention(q, k, v, masks.frames, alpha, drop)
        T = self.cfg.text_length
        text = attend(q[:, :, :T], k[:, :, :T], v[:, :, :T], masks.text, None, alpha, drop)
        if masks.frames is None:
            return text
        return torch.cat(
            [text, blocked.spatial_attention(q[:, :, T:], k, v, masks.frames, alpha, drop)], dim=2
        )

    def _temporal_blocked(self, q, k, v, masks: Masks, shift: int, alpha: float, drop: float):
        if masks.text is None:
            return blocked.temporal_attention(q, k, v, masks.frames, shift, alpha, drop)
        T = self.cfg.text_length  # text rows take the spatial output (see _mix): zeros here
        frames = blocked.temporal_attention(q[:, :, T:], k, v, masks.frames, shift, alpha, drop)
        return torch.cat([torch.zeros_like(q[:, :, :T]), frames], dim=2)


class CogVideoModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        hidden_size = cfg.hidden_size
        self.word_embeddings = TiedEmbedding(cfg.vocab.vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(cfg.position_rows, hidden_size)
        if cfg.has_temporal and cfg.num_frames > 1:
            self.frame_position_embeddings = nn.Embedding(
                (cfg.num_frames - 1) * cfg.tokens_per_frame, hidden_size
            )
        else:
            self.frame_position_embeddings = None
        self.layers = nn.ModuleList(TransformerLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(hidden_size, eps=cfg.layernorm_epsilon)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.dense_attention = False  # True: the explicit-mask reference path (tests, debugging)
        if cfg.has_temporal and not cfg.train_backbone:
            for name, param in self.named_parameters():
                if is_backbone_param(name):
                    param.requires_grad_(False)

    # ---- pieces shared by both paths -----------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {list(tokens.shape)}")
        vocab = self.cfg.vocab.vocab_size
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(
                f"token ids must be in [0, {vocab}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )

    def _embed(self, tokens: torch.Tensor, meta: TokenMeta, pad: torch.Tensor) -> torch.Tensor:
        backbone_row, extra_row = position_ids(self.cfg, meta.to(tokens.device), pad)
        pos = self.position_embeddings(backbone_row)
        if self.frame_position_embeddings is not None and bool((extra_row >= 0).any()):
            extra = self.frame_position_embeddings(extra_row.clamp(min=0))
            pos = torch.where((extra_row >= 0)[None, :, None], extra[None], pos)
        return self.embedding_dropout(self.word_embeddings(tokens) + pos)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output layer (under TP: this rank's vocabulary shard of the logits)."""
        return self.word_embeddings.unembed(self.final_layernorm(h))

    def _pad(self, tokens: torch.Tensor, meta: TokenMeta) -> torch.Tensor:
        return (tokens == self.cfg.vocab.pad_id) & (meta.frame == TEXT).to(tokens.device)[None, :]

    # ---- full forward ---------------------------------------------------------------
    def layout_meta(self, length: int) -> TokenMeta:
        cfg = self.cfg
        frames, rest = divmod(length - cfg.text_length, cfg.tokens_per_frame)
        if length < cfg.text_length or rest or frames > cfg.num_frames:
            raise ValueError(
                f"sequence length {length} does not fit the layout: text_length={cfg.text_length} + "
                f"k * tokens_per_frame={cfg.tokens_per_frame} with k <= num_frames={cfg.num_frames}"
            )
        return TokenMeta.layout(cfg, list(range(frames)))

    def forward(self, tokens: torch.Tensor, temporal: bool = True, text_bias: float = 0.0) -> torch.Tensor:
        """tokens [B, L] in time order -> logits [B, L, vocab_size / tp]."""
        self._check_tokens(tokens)
        meta = self.layout_meta(tokens.shape[1])
        pad = self._pad(tokens, meta)
        masks = self._full_masks(meta, pad, text_bias, temporal)
        h = self._embed(tokens, meta, pad)
        masks.for_kernel(h.dtype, self.cfg.pb_relax_alpha)
        for layer in self.layers:
            h = layer(h, masks, temporal, self.dense_attention)
        return self._logits(h)

    def _full_masks(
        self, meta: TokenMeta, pad: torch.Tensor, text_bias: float, temporal: bool = True
    ) -> Masks:
        cfg, device = self.cfg, pad.device
        T = cfg.text_length
        masks = Masks(is_frame=(meta.frame != TEXT).to(device))
        if self.dense_attention:
            for channel in ("spatial", "temporal"):
                masks.add_dense(cfg, channel, meta, pad, meta, pad, text_bias)
            return masks
        text = meta[:T]
        masks.text = with_pads(visible(cfg, text, text, "spatial").to(device), pad[:, :T], pad[:, :T])
        frames = meta.frame[T :: cfg.tokens_per_frame].tolist()
        if frames:
            masks.frames = frame_blocks(cfg, text, pad[:, :T], frames, text_bias, temporal)
        return masks

    # ---- incremental decoding -------------------------------------------------------
    def new_cache(self, temporal: bool = True) -> KVCache:
        """A KV cache; temporal=False runs the backbone alone (CogView2 behaviour, frame 0)."""
        return KVCache(self.cfg, temporal=temporal)

    def forward_chunk(
        self,
        tokens: torch.Tensor,
        meta: TokenMeta,
        cache: KVCache,
        text_bias: float = 0.0,
        logits: bool = True,
    ) -> torch.Tensor | None:
        """Feed `tokens` [B, l] described by `meta` after what `cache` holds; returns their
        logits [B, l, vocab_size / tp] equal to the full forward's at the same tokens (None with
        logits=False: a chunk fed only to fill the cache, e.g. the text and given frames, skips
        the output layer, l x hidden x vocabulary multiply-adds)."""
        self._check_tokens(tokens)
        if len(meta) != tokens.shape[1]:
            raise ValueError(f"meta describes {len(meta)} tokens, got {tokens.shape[1]}")
        cfg, device = self.cfg, tokens.device
        pad = self._pad(tokens, meta)
        plan = cache.plan(meta, pad)
        temporal = cache.temporal is not None
        masks = Masks(is_frame=(meta.frame != TEXT).to(device))
        if plan.whole_frames is not None and not self.dense_attention:
            T = cache.text_length
            masks.frames = frame_blocks(
                cfg, plan.spatial_keys[:T], plan.spatial_pad[:, :T], plan.whole_frames, text_bias, temporal
            )
        else:
            masks.add_dense(cfg, "spatial", meta, pad, plan.spatial_keys, plan.spatial_pad, text_bias)
            if temporal:
                masks.add_dense(cfg, "temporal", meta, pad, *cache.temporal_keys(plan), text_bias)
        h = self._embed(tokens, meta, pad)
        masks.for_kernel(h.dtype, cfg.pb_relax_alpha)
        for layer in self.layers:
            h = layer.forward_chunk(h, cache, plan, masks)
        return self._logits(h) if logits else None

    # ---- loss -----------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy over image ids at the masked positions."""
        return image_token_loss(self.cfg, logits, targets, loss_mask)


def image_token_loss(
    cfg: ModelConfig, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Mean cross entropy over the image ids of (vocabulary-parallel) logits at the masked positions."""
    per_token = vocab_cross_entropy(logits, targets, cfg.vocab.num_image_tokens)
    weights = loss_mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)


def init_video_from_backbone(backbone: dict, video_cfg: ModelConfig) -> dict:
    """Full backbone state dict -> full video-model state dict: the temporal channel starts as a
    copy of the spatial one (QKV and output projection), the gate at 0, and the frame position
    table as the backbone's image rows tiled over frames 1.., so on one frame the video model
    equals the backbone."""
    cfg = video_cfg
    needed = ["word_embeddings.weight", "position_embeddings.weight"] + [
        f"layers.{i}.attention.{p}.{t}"
        for i in range(cfg.num_layers)
        for p in ("query_key_value", "dense")
        for t in ("weight", "bias")
    ]
    missing = [k for k in needed if k not in backbone]
    if missing:
        raise ValueError(f"backbone state dict lacks {len(missing)} keys, e.g. {missing[:5]}")
    extra = [k for k in backbone if not is_backbone_param(k)]
    if extra:
        raise ValueError(f"not a backbone state dict: it holds video parameters {extra[:5]}")
    out = dict(backbone)
    for i in range(cfg.num_layers):
        for part in ("query_key_value", "dense"):
            for kind in ("weight", "bias"):
                out[f"layers.{i}.temporal_attention.{part}.{kind}"] = backbone[
                    f"layers.{i}.attention.{part}.{kind}"
                ].clone()
        out[f"layers.{i}.temporal_gate"] = torch.zeros(
            cfg.hidden_size, dtype=backbone["position_embeddings.weight"].dtype
        )
    if cfg.num_frames > 1:
        start = cfg.position_offset
        image_rows = backbone["position_embeddings.weight"][start : start + cfg.tokens_per_frame]
        out["frame_position_embeddings.weight"] = image_rows.repeat(cfg.num_frames - 1, 1).clone()
    return out

"""The CogVideo model: CogView2's Sandwich-LN transformer with a second (temporal) attention
channel in every layer.

Built plain; under tensor parallelism the same code runs with megatron-core's parallel layers
(see cogvideo/layers.py). Three attention paths share one visibility rule (cogvideo/sequence.py):

- blocked (default): text, per-frame spatial blocks and per-window temporal blocks gathered
  into the batch dimension;
- dense (reference, `model.dense_attention = True`): one explicit L x L mask per channel;
- cached (`forward_chunk`): incremental decoding over a KV cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cogvideo import parallel
from cogvideo.attention import attend, window_gather_index
from cogvideo.config import ModelConfig
from cogvideo.kv_cache import ChunkPlan, KVCache
from cogvideo.layers import LayerFactory, copy_to_tp_region, image_token_cross_entropy
from cogvideo.sequence import TEXT, TokenMeta, layer_shift, position_ids, visible

TEMPORAL_PARAMS = ("frame_position_embeddings.", ".temporal_attention.", ".temporal_gate")


def is_backbone_param(name: str) -> bool:
    """CogView2's own parameters (frozen in video training unless cfg.train_backbone)."""
    return not any(part in name or name.startswith(part) for part in TEMPORAL_PARAMS)


class Attention(nn.Module):
    """One attention channel's QKV ([Q; K; V], column-split with stride 3) and output projection."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory):
        super().__init__()
        h, std = cfg.hidden_size, cfg.init_std
        self.heads = cfg.num_heads // layers.tp
        self.head_dim = cfg.head_dim
        self.query_key_value = layers.column(h, 3 * h, std, stride=3)
        self.dense = layers.row(h, h, std / math.sqrt(2 * cfg.num_layers))

    def qkv(self, x: torch.Tensor):
        """x [B, L, h] -> q, k, v each [B, heads, L, d]."""
        B, L, _ = x.shape
        q, k, v = self.query_key_value(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def project(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx [B, heads, L, d] -> [B, L, h]."""
        B, _, L, _ = ctx.shape
        return self.dense(ctx.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory):
        super().__init__()
        self.dense_h_to_4h = layers.column(cfg.hidden_size, cfg.ffn_size, cfg.init_std)
        self.dense_4h_to_h = layers.row(cfg.ffn_size, cfg.hidden_size, cfg.init_std / math.sqrt(2 * cfg.num_layers))

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


@dataclass
class Masks:
    """Masks of one full forward, built once and shared by all layers (bool, True = attend),
    and the text-attention bias (additive, or None) in the same shapes."""

    text: torch.Tensor  # [B, 1, T, T]
    frames: torch.Tensor | None  # [B*nf, 1, n, T+n]
    temporal: dict  # shift -> mask; stage 1: [B, 1, nf*n, L]; stage 2: [B*nW, 1, nf*w*w, T+nf*w*w]
    window_index: dict  # stage 2: shift -> [nW, nf*w*w] gather index into the frame tokens
    dense: dict  # dense reference path: (channel, shift) -> [B, 1, L, L]
    bias: dict  # same keys as the masks it applies to ("frames", ("temporal", shift), ...)


def _with_pads(vis: torch.Tensor, key_pad: torch.Tensor, query_pad: torch.Tensor) -> torch.Tensor:
    """vis [..., q, k] & key not a pad; pad queries (ignored rows) may see pads to stay finite."""
    return vis & (~key_pad[:, None, None, :] | query_pad[:, None, :, None])


def _text_bias(mask: torch.Tensor, q: TokenMeta, k: TokenMeta, bias: float) -> torch.Tensor | None:
    """CogView2's log attention weights: +bias on text keys seen from frame queries."""
    if not bias:
        return None
    cells = ((q.frame != TEXT)[:, None] & (k.frame == TEXT)[None, :]).to(torch.float32) * bias
    return cells.expand(mask.shape[-2:]).to(mask.device)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory, index: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layernorm_epsilon
        self.cfg, self.index, self.shift = cfg, index, layer_shift(cfg, index)
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = Attention(cfg, layers)
        self.third_layernorm = nn.LayerNorm(h, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = MLP(cfg, layers)
        self.fourth_layernorm = nn.LayerNorm(h, eps=eps)
        if cfg.has_temporal:
            self.temporal_attention = Attention(cfg, layers)
            self.temporal_gate = nn.Parameter(torch.zeros(h))

    def _mix(self, spatial_out: torch.Tensor, temporal_out: torch.Tensor, is_frame: torch.Tensor):
        """Frame tokens: sigmoid(p) * spatial + (1 - sigmoid(p)) * temporal; text: spatial."""
        a = torch.sigmoid(self.temporal_gate)
        mixed = a * spatial_out + (1 - a) * temporal_out
        return torch.where(is_frame[None, :, None], mixed, spatial_out)

    def _finish(self, h, attn_out):
        h = h + self.third_layernorm(attn_out)
        return h + self.fourth_layernorm(self.mlp(self.post_attention_layernorm(h)))

    # ---- full sequence --------------------------------------------------------------
    def forward(self, h: torch.Tensor, masks: Masks, temporal: bool, dense: bool, pb: float):
        cfg, T = self.cfg, self.cfg.text_length
        x = self.input_layernorm(h)
        q, k, v = self.attention.qkv(x)
        if dense:
            ctx = attend(q, k, v, masks.dense["spatial", 0], masks.bias.get(("dense", "spatial")), pb)
        else:
            ctx = self._spatial_blocked(q, k, v, masks, pb)
        out = self.attention.project(ctx)
        L = h.shape[1]
        if temporal and cfg.has_temporal and L > T:
            tq, tk, tv = self.temporal_attention.qkv(x)
            if dense:
                key = ("temporal", self.shift if cfg.stage == "stage2" else 0)
                tctx = attend(tq, tk, tv, masks.dense[key], masks.bias.get(("dense", "temporal")), pb)
            else:
                tctx = torch.cat([torch.zeros_like(tq[:, :, :T]), self._temporal_blocked(tq, tk, tv, masks, pb)], 2)
            is_frame = torch.arange(L, device=h.device) >= T
            out = self._mix(out, self.temporal_attention.project(tctx), is_frame)
        return self._finish(h, out)

    def _spatial_blocked(self, q, k, v, masks: Masks, pb: float):
        T, n = self.cfg.text_length, self.cfg.tokens_per_frame
        B, H, L, d = q.shape
        text = attend(q[:, :, :T], k[:, :, :T], v[:, :, :T], masks.text, None, pb)
        nf = (L - T) // n
        if nf == 0:
            return text

        def per_frame(t):  # [B, H, nf*n, d] -> [B*nf, H, n, d]
            return t[:, :, T:].reshape(B, H, nf, n, d).transpose(1, 2).reshape(B * nf, H, n, d)

        def with_text(t):
            text_part = t[:, :, :T].unsqueeze(1).expand(B, nf, H, T, d).reshape(B * nf, H, T, d)
            return torch.cat([text_part, per_frame(t)], dim=2)

        frames = attend(per_frame(q), with_text(k), with_text(v), masks.frames, masks.bias.get("frames"), pb)
        frames = frames.reshape(B, nf, H, n, d).transpose(1, 2).reshape(B, H, nf * n, d)
        return torch.cat([text, frames], dim=2)

    def _temporal_blocked(self, q, k, v, masks: Masks, pb: float):
        """Frame queries only -> [B, H, L - T, d]."""
        T = self.cfg.text_length
        if self.cfg.stage == "stage1":
            return attend(q[:, :, T:], k, v, masks.temporal[0], masks.bias.get(("temporal", 0)), pb)
        index = masks.window_index[self.shift]  # [nW, nf*w*w]
        B, H, L, d = q.shape
        nW, per_window = index.shape

        def windows(t):  # frame tokens gathered into windows: [B*nW, H, per_window, d]
            return t[:, :, T:][:, :, index.flatten()].reshape(B, H, nW, per_window, d).transpose(1, 2) \
                .reshape(B * nW, H, per_window, d)

        def with_text(t):
            text_part = t[:, :, :T].unsqueeze(1).expand(B, nW, H, T, d).reshape(B * nW, H, T, d)
            return torch.cat([text_part, windows(t)], dim=2)

        out = attend(windows(q), with_text(k), with_text(v), masks.temporal[self.shift],
                     masks.bias.get(("temporal", self.shift)), pb)
        out = out.reshape(B, nW, H, per_window, d).transpose(1, 2).reshape(B, H, nW * per_window, d)
        return torch.empty_like(out).index_copy_(2, index.flatten().to(out.device), out)

    # ---- incremental ----------------------------------------------------------------
    def forward_chunk(self, h, cache: KVCache, plan: ChunkPlan, masks: dict, pb: float):
        x = self.input_layernorm(h)
        q, k, v = self.attention.qkv(x)
        sk, sv = cache.spatial_kv(self.index, plan, k, v)
        out = self.attention.project(attend(q, sk, sv, masks["spatial"], masks.get("spatial_bias"), pb))
        if cache.temporal is not None:
            tq, tk, tv = self.temporal_attention.qkv(x)
            tk, tv = cache.temporal_kv(self.index, plan, tk, tv)
            shift = self.shift if self.cfg.stage == "stage2" else 0
            tctx = attend(tq, tk, tv, masks["temporal", shift], masks.get("temporal_bias"), pb)
            out = self._mix(out, self.temporal_attention.project(tctx), masks["is_frame"])
        return self._finish(h, out)


class CogVideoModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate(parallel.tp_size())
        self.cfg = cfg
        layers = LayerFactory()
        h = cfg.hidden_size
        self.word_embeddings = layers.embedding(cfg.vocab.vocab_size, h, cfg.init_std)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        nn.init.normal_(self.position_embeddings.weight, std=cfg.init_std)
        if cfg.has_temporal and cfg.num_frames > 1:
            self.frame_position_embeddings = nn.Embedding((cfg.num_frames - 1) * cfg.tokens_per_frame, h)
            nn.init.normal_(self.frame_position_embeddings.weight, std=cfg.init_std)
        else:
            self.frame_position_embeddings = None
        self.layers = nn.ModuleList(TransformerLayer(cfg, layers, i) for i in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(h, eps=cfg.layernorm_epsilon)
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
            raise ValueError(f"token ids must be in [0, {vocab}), got [{int(tokens.min())}, {int(tokens.max())}]")

    def _embed(self, tokens: torch.Tensor, meta: TokenMeta) -> torch.Tensor:
        backbone_row, extra_row = position_ids(self.cfg, meta.to(tokens.device))
        pos = self.position_embeddings(backbone_row)
        if self.frame_position_embeddings is not None and bool((extra_row >= 0).any()):
            extra = self.frame_position_embeddings(extra_row.clamp(min=0))
            pos = torch.where((extra_row >= 0)[:, None], extra, pos)
        return self.word_embeddings(tokens) + pos

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output layer: this rank's vocabulary shard of the logits."""
        h = copy_to_tp_region(self.final_layernorm(h))
        return F.linear(h, self.word_embeddings.weight)

    def _pad(self, tokens: torch.Tensor, meta: TokenMeta) -> torch.Tensor:
        return (tokens == self.cfg.vocab.pad_id) & (meta.frame == TEXT).to(tokens.device)[None, :]

    # ---- full forward ---------------------------------------------------------------
    def layout_meta(self, length: int) -> TokenMeta:
        cfg = self.cfg
        frames, rest = divmod(length - cfg.text_length, cfg.tokens_per_frame)
        if length < cfg.text_length or rest or frames > cfg.num_frames:
            raise ValueError(
                f"sequence length {length} does not fit the layout: text_length={cfg.text_length} + "
                f"k * tokens_per_frame={cfg.tokens_per_frame} with k <= num_frames={cfg.num_frames}")
        return TokenMeta.layout(cfg, list(range(frames)))

    def forward(self, tokens: torch.Tensor, temporal: bool = True, text_bias: float = 0.0) -> torch.Tensor:
        """tokens [B, L] in time order -> logits [B, L, vocab_size / tp]."""
        self._check_tokens(tokens)
        meta = self.layout_meta(tokens.shape[1])
        masks = self._full_masks(tokens, meta, text_bias)
        h = self._embed(tokens, meta)
        pb = self.cfg.pb_relax_alpha
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, masks, temporal, self.dense_attention, pb, use_reentrant=False)
            else:
                h = layer(h, masks, temporal, self.dense_attention, pb)
        return self._logits(h)

    def _full_masks(self, tokens: torch.Tensor, meta: TokenMeta, text_bias: float) -> Masks:
        cfg, device = self.cfg, tokens.device
        T, n = cfg.text_length, cfg.tokens_per_frame
        B, L = tokens.shape
        nf = (L - T) // n
        pad = self._pad(tokens, meta)
        text_pad = pad[:, :T]
        text = TokenMeta.text(cfg)
        masks = Masks(_with_pads(visible(cfg, text, text, "spatial").to(device), text_pad, text_pad),
                      None, {}, {}, {}, {})
        no_pad = torch.zeros(B, n, dtype=torch.bool, device=device)
        shifts = {0, cfg.window_shift} if cfg.stage == "stage2" and cfg.num_layers > 1 else {0}
        if self.dense_attention:
            for channel in ("spatial", "temporal"):
                for shift in shifts:
                    vis = visible(cfg, meta, meta, channel, shift).to(device)
                    masks.dense[channel, shift] = _with_pads(vis, pad, pad)
                bias = _text_bias(masks.dense[channel, 0], meta, meta, text_bias)
                if bias is not None:
                    masks.bias["dense", channel] = bias
            return masks
        if nf:
            frame_masks, bias = [], None
            for f in range(nf):
                keys = TokenMeta.cat([text, TokenMeta.of_frame(cfg, f)])
                vis = visible(cfg, TokenMeta.of_frame(cfg, f), keys, "spatial").to(device)
                frame_masks.append(_with_pads(vis, torch.cat([text_pad, no_pad], 1), no_pad))
                bias = _text_bias(vis, TokenMeta.of_frame(cfg, f), keys, text_bias)
            masks.frames = torch.stack(frame_masks, 1).reshape(B * nf, 1, n, T + n)
            if bias is not None:
                masks.bias["frames"] = bias
            frames_meta = meta[T:]
            if cfg.stage == "stage1":
                vis = visible(cfg, frames_meta, meta, "temporal").to(device)
                masks.temporal[0] = _with_pads(vis, pad, torch.zeros(B, nf * n, dtype=torch.bool, device=device))
                bias = _text_bias(vis, frames_meta, meta, text_bias)
                if bias is not None:
                    masks.bias["temporal", 0] = bias
            elif cfg.stage == "stage2":
                for shift in shifts:
                    index, wmeta = window_gather_index(cfg, nf, shift)
                    nW, per = index.shape
                    windows = [wmeta[w * per:(w + 1) * per] for w in range(nW)]
                    vis = torch.stack([visible(cfg, q, TokenMeta.cat([text, q]), "temporal", shift)
                                       for q in windows]).to(device)  # [nW, per, T+per]
                    key_pad = torch.cat([text_pad, torch.zeros(B, per, dtype=torch.bool, device=device)], 1)
                    masks.temporal[shift] = (vis[None] & ~key_pad[:, None, None, :]).reshape(B * nW, 1, per, T + per)
                    masks.window_index[shift] = index.to(device)
                    # every window has the same text-then-frames column layout
                    bias = _text_bias(vis[0], windows[0], TokenMeta.cat([text, windows[0]]), text_bias)
                    if bias is not None:
                        masks.bias["temporal", shift] = bias
        return masks

    # ---- incremental decoding -------------------------------------------------------
    def new_cache(self, temporal: bool = True) -> KVCache:
        """A KV cache; temporal=False runs the backbone alone (CogView2 behaviour, frame 0)."""
        return KVCache(self.cfg, temporal=temporal)

    def forward_chunk(self, tokens: torch.Tensor, meta: TokenMeta, cache: KVCache,
                      text_bias: float = 0.0) -> torch.Tensor:
        """Feed `tokens` [B, l] described by `meta` after what `cache` holds; returns their
        logits [B, l, vocab_size / tp] equal to the full forward's at the same tokens."""
        self._check_tokens(tokens)
        if len(meta) != tokens.shape[1]:
            raise ValueError(f"meta describes {len(meta)} tokens, got {tokens.shape[1]}")
        cfg, device = self.cfg, tokens.device
        pad = self._pad(tokens, meta)
        plan = cache.plan(meta, pad)
        masks = {"spatial": _with_pads(visible(cfg, meta, plan.spatial_keys, "spatial").to(device),
                                       plan.spatial_pad, pad)}
        bias = _text_bias(masks["spatial"], meta, plan.spatial_keys, text_bias)
        if bias is not None:
            masks["spatial_bias"] = bias
        if cache.temporal is not None:
            keys, key_pad = cache.temporal_keys(plan)
            shifts = {0, cfg.window_shift} if cfg.stage == "stage2" else {0}
            for shift in shifts:
                vis = visible(cfg, meta, keys, "temporal", shift).to(device)
                masks["temporal", shift] = _with_pads(vis, key_pad, pad)
            bias = _text_bias(vis, meta, keys, text_bias)
            if bias is not None:
                masks["temporal_bias"] = bias
            masks["is_frame"] = (meta.frame != TEXT).to(device)
        h = self._embed(tokens, meta)
        for layer in self.layers:
            h = layer.forward_chunk(h, cache, plan, masks, cfg.pb_relax_alpha)
        return self._logits(h)

    # ---- loss -----------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy over image ids at the masked positions."""
        per_token = image_token_cross_entropy(logits, targets, self.cfg.vocab.num_image_tokens)
        weights = loss_mask.to(per_token.dtype)
        return (per_token * weights).sum() / weights.sum().clamp(min=1)


def init_video_from_backbone(backbone: dict, video_cfg: ModelConfig) -> dict:
    """Full backbone state dict -> full video-model state dict: the temporal channel starts as a
    copy of the spatial one (QKV and output projection), the gate at 0, and the frame position
    table as the backbone's image rows tiled over frames 1.., so on one frame the video model
    equals the backbone."""
    cfg = video_cfg
    needed = ["word_embeddings.weight", "position_embeddings.weight"] + [
        f"layers.{i}.attention.{p}.{t}" for i in range(cfg.num_layers)
        for p in ("query_key_value", "dense") for t in ("weight", "bias")]
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
                out[f"layers.{i}.temporal_attention.{part}.{kind}"] = backbone[f"layers.{i}.attention.{part}.{kind}"].clone()
        out[f"layers.{i}.temporal_gate"] = torch.zeros(cfg.hidden_size, dtype=backbone["position_embeddings.weight"].dtype)
    if cfg.num_frames > 1:
        start = cfg.image_position_offset
        image_rows = backbone["position_embeddings.weight"][start:start + cfg.tokens_per_frame]
        out["frame_position_embeddings.weight"] = image_rows.repeat(cfg.num_frames - 1, 1).clone()
    return out

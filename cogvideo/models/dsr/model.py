"""DSR's model: the CogView2 backbone (cogvideo/models/cogvideo/model.py's layers, frozen) with, in every layer,
a second attention for the high-res rows, and a position table for the high-res slots.

Rows before the high-res block (text, low-res frame) run the backbone's attention over those
rows; high-res rows run `high_attention` over their local windows (cogvideo/models/dsr/
local_attention.py), whose low-res keys and values are the backbone attention's; layer norms and
MLP are the backbone's for every row. The logits of the high-res rows are the tied word
embedding's. `model.dense_attention = True` runs the windows as one explicit mask over all
low-res and high-res keys instead (the reference path).

Full state-dict names beyond the backbone's (docs/architecture.md):

    high_position_embeddings.weight                          [high_frame_tokens**2, h]
    layers.{i}.high_attention.query_key_value.{weight,bias}  [3h, h] as [Q; K; V]
    layers.{i}.high_attention.dense.{weight,bias}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cogvideo import parallel
from cogvideo.models.cogvideo.attention import attend
from cogvideo.models.cogvideo.model import Attention, TransformerLayer, is_backbone_param
from cogvideo.models.cogvideo.model import init_weights as backbone_init
from cogvideo.models.dsr.config import DsrConfig
from cogvideo.models.dsr.layout import context_mask, high_res_keys, position_ids, text_pads
from cogvideo.models.dsr.local_attention import Windows, local_attention
from cogvideo.tp_plan import Column, Row, TiedEmbedding, TPPlan, Vocab, vocab_cross_entropy

DSR_PARAMS = ("high_position_embeddings.", ".high_attention.")

TP_PLAN = TPPlan(
    {
        "word_embeddings": Vocab(),
        "attention.query_key_value": Column(stride=3),
        "attention.dense": Row(),
        "high_attention.query_key_value": Column(stride=3),
        "high_attention.dense": Row(),
        "mlp.dense_h_to_4h": Column(),
        "mlp.dense_4h_to_h": Row(),
    },
    blocks="layers",
)


def is_dsr_param(name: str) -> bool:
    """DSR's own parameters (the trained ones); the rest is the CogView2 backbone."""
    return any(part in name or name.startswith(part) for part in DSR_PARAMS)


def init_weights(cfg: DsrConfig, name: str, tensor: torch.Tensor) -> None:
    """The backbone's initialisation (cogvideo.models.cogvideo.model.init_weights) for every parameter, the
    high-res position table normal(init_std). DSR starts from a backbone with
    `init_from_backbone`, which overwrites DSR's parameters as the release's `reinit` does."""
    if name == "high_position_embeddings.weight":
        nn.init.normal_(tensor, std=cfg.init_std)
    else:
        backbone_init(cfg, name, tensor)


@dataclass
class Context:
    """What every layer of one forward attends with, built once."""

    mask: torch.Tensor  # [B, 1, T+n, T+n] rows before the high-res block
    windows: Windows | None = None  # local path
    dense: torch.Tensor | None = None  # reference path: [N, n+N] over [low-res keys; high-res keys]


class DsrLayer(TransformerLayer):
    """A backbone layer (its norms, attention and MLP) plus the high-res rows' attention."""

    def __init__(self, cfg: DsrConfig, index: int):
        super().__init__(cfg, index)
        self.high_attention = Attention(cfg)

    def forward(self, h: torch.Tensor, context: Context) -> torch.Tensor:
        cfg = self.cfg
        start, T = cfg.high_start, cfg.text_length
        alpha, drop = cfg.pb_relax_alpha, cfg.attention_dropout if self.training else 0.0
        x = self.input_layernorm(h)
        q, k, v = self.attention.qkv(x[:, :start])
        hq, hk, hv = self.high_attention.qkv(x[:, start:])
        low_k, low_v = k[:, :, T:], v[:, :, T:]
        ctx = attend(q, k, v, context.mask, None, alpha, drop)
        if context.dense is not None:
            keys, values = torch.cat([low_k, hk], dim=2), torch.cat([low_v, hv], dim=2)
            high_ctx = attend(hq, keys, values, context.dense, None, alpha, drop)
        else:
            high_ctx = local_attention(hq, hk, hv, low_k, low_v, context.windows, drop)
        out = torch.cat([self.attention.project(ctx), self.high_attention.project(high_ctx)], dim=1)
        return self._finish(h, out)


class DsrModel(nn.Module):
    def __init__(self, cfg: DsrConfig):
        super().__init__()
        self.cfg = cfg.validate()
        hidden = cfg.hidden_size
        self.word_embeddings = TiedEmbedding(cfg.vocab.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, hidden)
        self.high_position_embeddings = nn.Embedding(cfg.high_tokens, hidden)
        self.layers = nn.ModuleList(DsrLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(hidden, eps=cfg.layernorm_epsilon)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.dense_attention = False  # True: the explicit-mask reference path (tests, benchmarks)
        if not cfg.train_backbone:
            for name, param in self.named_parameters():
                if not is_dsr_param(name):
                    param.requires_grad_(False)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        cfg = self.cfg
        if tokens.dim() != 2 or tokens.shape[1] != cfg.seq_length:
            raise ValueError(
                f"tokens must be [batch, {cfg.seq_length}] ({cfg.text_length} text + "
                f"{cfg.tokens_per_frame} low-res + {cfg.high_tokens} high-res), got {list(tokens.shape)}"
            )
        vocab = cfg.vocab.vocab_size
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(
                f"token ids must be in [0, {vocab}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )

    def _context(self, pads: torch.Tensor) -> Context:
        context = Context(mask=context_mask(self.cfg, pads))
        if self.dense_attention:
            context.dense = high_res_keys(self.cfg).to(pads.device)
        else:
            context.windows = Windows(self.cfg, pads.device)
        return context

    def forward(self, tokens: torch.Tensor, image_only: bool = False) -> torch.Tensor:
        """tokens [B, L] (see cogvideo/models/dsr/layout.py) -> logits of the high-res slots,
        [B, N, vocab_size / tp] (this rank's vocabulary shard). `image_only` (sampling): in
        float32 as the release's output layer computes them, over the image ids alone without TP
        (under TP over this rank's shard, for the sampler to gather)."""
        self._check_tokens(tokens)
        cfg = self.cfg
        pads = text_pads(cfg, tokens)
        context = self._context(pads)
        high_rows = self.high_position_embeddings.weight[None].expand(len(tokens), -1, -1)
        positions = torch.cat([self.position_embeddings(position_ids(cfg, pads)), high_rows], dim=1)
        h = self.embedding_dropout(self.word_embeddings(tokens) + positions)
        for layer in self.layers:
            h = layer(h, context)
        h = self.final_layernorm(h[:, cfg.high_start :])
        if not image_only:
            return self.word_embeddings.unembed(h)
        weight = self.word_embeddings.weight
        if parallel.tp_size() == 1:
            weight = weight[: cfg.vocab.num_image_tokens]
        return F.linear(h.float(), weight.float())

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return high_res_loss(self.cfg, logits, targets)


def high_res_loss(cfg: DsrConfig, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the image ids at every high-res slot ([B, N, V / tp] logits)."""
    return vocab_cross_entropy(logits, targets, cfg.vocab.num_image_tokens).mean()


def init_from_backbone(backbone: dict, cfg: DsrConfig) -> dict:
    """Full backbone state dict -> full DSR state dict, as the release's mixins' `reinit` does:
    each layer's high-res attention a copy of its backbone attention (QKV and output
    projection), and the high-res position table the backbone's image rows (from
    `image_position_offset`) tiled over the high-res grid:
    high[R * side_high + C] = base[offset + side_low * (R % side_low) + C % side_low].
    A CogVideo stage's state dict gives its backbone (its temporal parts are left out)."""
    table = backbone.get("position_embeddings.weight")
    if table is None or any(is_dsr_param(k) for k in backbone):
        raise ValueError("init_from_backbone: expects a CogView2 backbone state dict (no DSR parameters)")
    out = {name: tensor for name, tensor in backbone.items() if is_backbone_param(name)}
    for i in range(cfg.num_layers):
        for part in ("query_key_value", "dense"):
            for kind in ("weight", "bias"):
                source = f"layers.{i}.attention.{part}.{kind}"
                if source not in backbone:
                    raise ValueError(f"init_from_backbone: the backbone lacks {source}")
                out[f"layers.{i}.high_attention.{part}.{kind}"] = backbone[source].clone()
    side, s, hidden = cfg.frame_tokens, cfg.scale, table.shape[1]
    rows = table[cfg.image_position_offset : cfg.image_position_offset + side * side]
    tiled = rows.view(1, side, 1, side, hidden).expand(s, side, s, side, hidden)
    out["high_position_embeddings.weight"] = tiled.reshape(cfg.high_tokens, hidden).clone()
    return out

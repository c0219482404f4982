"""The video generator (paper Sec. 3.2): a DiT (Peebles & Xie, 2023) over global features.

A global feature [C'', G, G] becomes G*G tokens (patch size 1) with fixed 2D sin-cos positions (computed, not stored);
the caption's token embeddings go in front of them (in-context conditioning, as the released
DiT_crossattn does with its text tokens; padding is masked out of attention); the timestep
conditions every block through adaLN-Zero. Blocks are plain `nn.Linear` layers that the TP plan
splits: QKV and the MLP's first layer by columns, the attention output and the MLP's second
layer by rows, the caption embedding by vocabulary rows. Attention infers its local head count
from the width, so the same code runs a TP shard.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from torch import nn

from cogvideo.models.glober.config import GloberConfig
from cogvideo.sdpa import sdpa


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)  # local heads
        out = sdpa(q, k, v, attn_mask=keep[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, ratio: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ratio * hidden)
        self.fc2 = nn.Linear(ratio * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attention = SelfAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Linear(hidden, 6 * hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(F.silu(c)).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attention(modulate(self.norm1(x), shift1, scale1), keep)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(F.silu(c)).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class GlobalDiT(nn.Module):
    def __init__(self, cfg: GloberConfig):
        super().__init__()
        d, channels, size = cfg.dit, cfg.encoder.out_channels, cfg.global_size
        self.text_offset, self.pad_id = cfg.vocab.text_offset, cfg.vocab.pad_id
        self.size, self.hidden_size = size, d.hidden_size
        self.x_embedder = nn.Linear(channels, d.hidden_size)
        self.text_embeddings = nn.Embedding(cfg.vocab.num_text_tokens, d.hidden_size)
        self.timestep = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.t_embedder = TimestepEmbedding(256, d.hidden_size)
        self.blocks = nn.ModuleList(DiTBlock(d.hidden_size, d.num_heads, d.mlp_ratio) for _ in range(d.depth))
        self.final_layer = FinalLayer(d.hidden_size, channels)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Noisy global features [B, C'', G, G], timesteps [B] and caption ids [B, text_length]
        (model ids, left-padded with the pad id) -> the prediction [B, C'', G, G]."""
        b, c = x.shape[:2]
        positions = get_2d_sincos_pos_embed(
            self.hidden_size, self.size, base_size=self.size, output_type="pt", device=x.device
        )
        tokens = self.x_embedder(x.flatten(2).transpose(1, 2)) + positions.to(x.dtype)
        caption = self.text_embeddings(text - self.text_offset)
        h = torch.cat([caption.to(tokens.dtype), tokens], dim=1)
        keep = torch.cat(
            [text != self.pad_id, torch.ones(b, tokens.shape[1], dtype=torch.bool, device=x.device)], 1
        )
        cond = self.t_embedder(self.timestep(timestep.flatten()).to(tokens.dtype))
        for block in self.blocks:
            h = block(h, cond, keep)
        out = self.final_layer(h[:, caption.shape[1] :], cond)
        return out.transpose(1, 2).reshape(b, c, self.size, self.size)


def init_dit(cfg: GloberConfig, name: str, tensor: torch.Tensor) -> None:
    """DiT's initialisation: Xavier-uniform linear weights, zero biases, adaLN modulation and the
    output layer zero (adaLN-Zero), timestep MLP normal(0.02), caption embeddings normal(init_std)."""
    if "adaLN_modulation" in name or name.startswith("final_layer.linear") or name.endswith("bias"):
        nn.init.zeros_(tensor)
    elif name.startswith("t_embedder"):
        nn.init.normal_(tensor, std=0.02)
    elif name.startswith("text_embeddings"):
        nn.init.normal_(tensor, std=cfg.init_std)
    else:  # x_embedder, qkv, proj, fc1, fc2: Xavier uniform over the full (unsharded) matrix
        bound = math.sqrt(6.0 / (tensor.shape[0] + tensor.shape[1]))
        nn.init.uniform_(tensor, -bound, bound)

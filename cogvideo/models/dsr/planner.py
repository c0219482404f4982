"""DSR's analytic FLOPs (the trainer's MFU, `cogvideo-plan`, the benchmark's roofline), counted
as cogvideo/flops.py counts CogVideo's: multiply-adds of the matrix products, attention over the
cells the kernels compute (the rows before the high-res block densely; each high-res query its
`window_keys` window), backward = input gradient always + weight gradient where the weight trains."""

from __future__ import annotations

from cogvideo.flops import MatmulFlops
from cogvideo.models.dsr.config import DsrConfig


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

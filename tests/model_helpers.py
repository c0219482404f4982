"""Small builders shared by the model tests."""

import torch

from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.sequence import build_sequence

# stage 2's windows as released (20x20 tokens, window 10 shifted by 5), in a narrow model
PUBLISHED_WINDOWS = dict(
    hidden_size=16,
    num_heads=2,
    frame_size=80,
    frame_tokens=20,
    window_size=10,
    window_shift=5,
    max_position_embeddings=8 + 400,
)


def random_batch(cfg, text_lengths=(3, None), seed=0):
    """Tokens, targets and loss masks for samples with the given text lengths (None = full)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for text_len in text_lengths:
        text_len = cfg.text_length if text_len is None else text_len
        text = torch.randint(
            cfg.vocab.text_offset, cfg.vocab.text_offset + cfg.vocab.num_text_tokens, (text_len,), generator=g
        )
        frames = torch.randint(
            0, cfg.vocab.num_image_tokens, (cfg.num_frames, cfg.frame_tokens, cfg.frame_tokens), generator=g
        )
        samples.append(build_sequence(cfg, text, frames))
    return [torch.stack(x) for x in zip(*samples)]


def random_model(preset, seed=0, **changes):
    cfg = get_preset(preset).replace(**changes)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-zero gates: both channels matter in the output
        for name, p in model.named_parameters():
            if name.endswith("temporal_gate"):
                p.normal_(std=1.0)
    return model

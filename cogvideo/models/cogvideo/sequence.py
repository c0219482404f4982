"""Sequence layout, position ids and the attention visibility rules.

Layout of one sample (time order, used for training)::

    [pad .. pad, text ..]            cfg.text_length tokens, left-padded with vocab.pad_id
    frame f: [BOI, t0, .., t(n-2)]   n = cfg.tokens_per_frame; block position p predicts t_p

Each token is described by a (frame, pos) pair: frame = -1 for text (pos = slot in the text
block), else the real frame index and the position inside the frame block. As in the release
(CogView2, CogVideo), text attends bidirectionally to all non-pad text and the real text tokens
take position ids 0..n-1 whatever the pad count. Every attention
path (blocked, windowed, dense reference, KV-cached) derives its mask from `visible()` so they
agree by construction, whatever order the tokens are fed in (stage 2 samples in slot order
0, 2, 4, 1, 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cogvideo.models.cogvideo.config import ModelConfig

TEXT = -1


@dataclass
class TokenMeta:
    """(frame, pos) of each token of a chunk; LongTensors [l]."""

    frame: torch.Tensor
    pos: torch.Tensor

    def __len__(self) -> int:
        return self.frame.numel()

    @classmethod
    def text(cls, cfg: ModelConfig, start: int = 0, stop: int | None = None) -> "TokenMeta":
        stop = cfg.text_length if stop is None else stop
        pos = torch.arange(start, stop)
        return cls(torch.full_like(pos, TEXT), pos)

    @classmethod
    def of_frame(
        cls, cfg: ModelConfig, frame_index: int, start: int = 0, stop: int | None = None
    ) -> "TokenMeta":
        if not 0 <= frame_index < cfg.num_frames:
            raise ValueError(f"frame index {frame_index} outside [0, num_frames={cfg.num_frames})")
        stop = cfg.tokens_per_frame if stop is None else stop
        if not 0 <= start < stop <= cfg.tokens_per_frame:
            raise ValueError(f"frame positions [{start}, {stop}) outside [0, {cfg.tokens_per_frame})")
        pos = torch.arange(start, stop)
        return cls(torch.full_like(pos, frame_index), pos)

    @classmethod
    def layout(cls, cfg: ModelConfig, frames: list[int] | tuple[int, ...]) -> "TokenMeta":
        """Text followed by whole frames in the given order."""
        return cls.cat([cls.text(cfg)] + [cls.of_frame(cfg, f) for f in frames])

    @classmethod
    def cat(cls, parts: list["TokenMeta"]) -> "TokenMeta":
        return cls(torch.cat([p.frame for p in parts]), torch.cat([p.pos for p in parts]))

    def to(self, device) -> "TokenMeta":
        return TokenMeta(self.frame.to(device), self.pos.to(device))

    def __getitem__(self, index) -> "TokenMeta":
        return TokenMeta(self.frame[index], self.pos[index])


def position_ids(
    cfg: ModelConfig, meta: TokenMeta, text_pad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in the backbone position table [B, l], row in the frame table or -1 [l]).

    `text_pad` [B, l] marks the pads among the tokens; the text must be whole in `meta` (a full
    sequence, or the one chunk that feeds the text). The real text tokens use rows 0..n-1 (as in
    the release, pads take row 0 and are masked out) and frame 0 the backbone's image rows from
    position_offset; frames 1.. use the extra frame table, row (f-1)*n + pos."""
    is_text = (meta.frame == TEXT).to(text_pad.device)
    text_row = ((is_text & ~text_pad).long().cumsum(dim=1) - 1).clamp(min=0)
    backbone_row = torch.where(is_text, text_row, cfg.position_offset + meta.pos.to(text_pad.device))
    extra_row = torch.where(
        meta.frame >= 1, (meta.frame - 1) * cfg.tokens_per_frame + meta.pos, torch.full_like(meta.pos, -1)
    )
    return backbone_row, extra_row


def _frame_sees_frame(cfg: ModelConfig, qf: torch.Tensor, kf: torch.Tensor) -> torch.Tensor:
    """Temporal channel, frame level: may a token of frame qf see frame kf (kf != qf)?"""
    if cfg.stage == "stage1":
        return kf < qf
    given = torch.zeros(cfg.num_frames + 1, dtype=torch.bool)
    given[list(cfg.given_frames)] = True
    q_given, k_given = given[qf.clamp(min=0)], given[kf.clamp(min=0)]
    # given frames see each other; a new frame sees the given ones and earlier new ones
    return k_given | (~q_given & (kf < qf))


def _bidirectional(cfg: ModelConfig, frame: torch.Tensor) -> torch.Tensor:
    """Frames whose tokens see their whole frame (stage-2 given frames); others are causal."""
    out = torch.zeros_like(frame, dtype=torch.bool)
    for f in cfg.given_frames:
        out |= frame == f
    return out


def window_id(cfg: ModelConfig, pos: torch.Tensor, shift: int) -> torch.Tensor:
    """Swin window of a frame position: the shifted (roll + region mask) partition is the
    non-cyclic partition with boundaries at shift, shift + w, ..."""
    side, w = cfg.frame_tokens, cfg.window_size
    row = torch.div(pos // side - shift, w, rounding_mode="floor")
    col = torch.div(pos % side - shift, w, rounding_mode="floor")
    return (row + 1) * (side // w + 1) + (col + 1)


def layer_shift(cfg: ModelConfig, layer: int) -> int:
    return cfg.window_shift if layer % 2 else 0


def visible(cfg: ModelConfig, q: TokenMeta, k: TokenMeta, channel: str, shift: int = 0) -> torch.Tensor:
    """Bool [lq, lk]: may query token i attend to key token j (before pad masking).

    spatial: text sees all text (bidirectional; pads are masked by the caller); a frame token
    sees the text and its own frame (causal, or whole for stage-2 given frames). temporal: a
    frame token sees the text and, stage 1, every earlier token in time; stage 2, the frames the
    slot rules allow, inside its 3D window. Text queries in the temporal channel are never used;
    they get the spatial rule."""
    qf, qp = q.frame[:, None], q.pos[:, None]
    kf, kp = k.frame[None, :], k.pos[None, :]
    q_text, k_text = qf == TEXT, kf == TEXT
    same_frame = (qf == kf) & ~q_text
    in_frame = same_frame & ((kp <= qp) | _bidirectional(cfg, qf))
    text_rule = q_text & k_text
    if channel == "spatial":
        return text_rule | (~q_text & k_text) | in_frame
    if channel != "temporal":
        raise ValueError(f"unknown attention channel {channel!r}")
    other_frame = ~q_text & ~k_text & ~same_frame & _frame_sees_frame(cfg, qf, kf)
    frames = in_frame | other_frame
    if cfg.stage == "stage2":
        frames &= window_id(cfg, qp, shift) == window_id(cfg, kp, shift)
    return text_rule | (~q_text & k_text) | frames


def build_sequence(cfg: ModelConfig, text_ids, frames) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training sample -> (tokens [L], targets [L], loss_mask [L]) in time order."""
    text_ids = torch.as_tensor(np.asarray(text_ids), dtype=torch.long).flatten()
    frames = torch.as_tensor(np.asarray(frames), dtype=torch.long)
    vocab = cfg.vocab
    if text_ids.numel() > cfg.text_length:
        raise ValueError(
            f"text has {text_ids.numel()} tokens; the layout allows text_length={cfg.text_length}"
        )
    if text_ids.numel() and not ((text_ids >= vocab.text_offset) & (text_ids < vocab.vocab_size)).all():
        raise ValueError(
            f"text ids must be in [{vocab.text_offset}, {vocab.vocab_size}); got {text_ids.tolist()}"
        )
    side = cfg.frame_tokens
    if tuple(frames.shape) != (cfg.num_frames, side, side):
        raise ValueError(
            f"frames must be [{cfg.num_frames}, {side}, {side}] image codes, got {list(frames.shape)}"
        )
    if frames.numel() and not ((frames >= 0) & (frames < vocab.num_image_tokens)).all():
        raise ValueError(
            f"frame codes must be in [0, {vocab.num_image_tokens}); got [{int(frames.min())}, {int(frames.max())}]"
        )
    pad = torch.full((cfg.text_length - text_ids.numel(),), vocab.pad_id, dtype=torch.long)
    flat = frames.reshape(cfg.num_frames, -1)
    boi = torch.full((cfg.num_frames, 1), vocab.boi_id, dtype=torch.long)
    frame_inputs = torch.cat([boi, flat[:, :-1]], dim=1).flatten()
    tokens = torch.cat([pad, text_ids, frame_inputs])
    targets = torch.cat([torch.zeros(cfg.text_length, dtype=torch.long), flat.flatten()])
    loss_mask = torch.zeros(cfg.seq_length, dtype=torch.bool)
    for f in cfg.loss_frames:
        start = cfg.text_length + f * cfg.tokens_per_frame
        loss_mask[start : start + cfg.tokens_per_frame] = True
    return tokens, targets, loss_mask

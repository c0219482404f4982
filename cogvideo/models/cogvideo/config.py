"""Model configuration and named presets.

Every shape the code uses (frame size, tokens per frame, frames per sample, text length,
vocabulary ranges, window size) comes from a :class:`ModelConfig`; nothing else in the
library hard-codes them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from cogvideo.configio import ConfigError
from cogvideo.vocab import VocabLayout

STAGES = ("backbone", "stage1", "stage2")


@dataclass
class ModelConfig:
    name: str = "tiny"
    stage: str = "stage1"  # backbone (CogView2, one frame), stage1 (sequential) or stage2 (interpolation)
    num_layers: int = 2
    hidden_size: int = 32
    num_heads: int = 4
    ffn_hidden_size: int = 0  # 0 means 4 * hidden_size
    vocab: VocabLayout = field(default_factory=lambda: VocabLayout.compact(64, 96))
    text_length: int = 8  # text tokens, left-padded
    frame_size: int = 16  # pixels per frame side
    frame_tokens: int = 4  # image tokens per frame side
    num_frames: int = 5
    # position id of a frame's first token in the backbone table; None: text_length (the frames'
    # positions follow the text's, which take 0..text_length-1, as the release lays them out)
    image_position_offset: int | None = None
    # rows of the backbone position table; None: image_position_offset + one frame's tokens
    max_position_embeddings: int | None = None
    window_size: int = 2  # stage-2 temporal window, in tokens per side
    window_shift: int = 1  # applied on odd layers
    layernorm_epsilon: float = 1e-5
    pb_relax_alpha: float = 32.0  # used by the explicit attention path (fp16 without fused kernels)
    init_std: float = 0.02
    hidden_dropout: float = 0.0  # SAT's: embeddings, attention output, MLP output (released: 0.1)
    attention_dropout: float = 0.0  # on the attention probabilities (released: 0.1)
    train_backbone: bool = False  # backbone (CogView2) parameters are frozen unless set
    activation_checkpointing: bool = False  # recompute each layer in the backward pass

    # ---- derived shapes -------------------------------------------------------------
    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def tokens_per_frame(self) -> int:
        return self.frame_tokens * self.frame_tokens

    @property
    def seq_length(self) -> int:
        return self.text_length + self.num_frames * self.tokens_per_frame

    @property
    def position_offset(self) -> int:
        """The backbone position row of a frame's first token (image_position_offset, or derived)."""
        return self.text_length if self.image_position_offset is None else self.image_position_offset

    @property
    def position_rows(self) -> int:
        """Rows of the backbone position table (max_position_embeddings, or derived)."""
        if self.max_position_embeddings is None:
            return self.position_offset + self.tokens_per_frame
        return self.max_position_embeddings

    @property
    def has_temporal(self) -> bool:
        return self.stage != "backbone"

    @property
    def given_frames(self) -> tuple[int, ...]:
        """Frames fed as context and never predicted (stage 2: the even frames)."""
        if self.stage == "stage2":
            return tuple(range(0, self.num_frames, 2))
        return ()

    @property
    def loss_frames(self) -> tuple[int, ...]:
        """Frames whose tokens carry the loss: stage 1 frames 1.., stage 2 the odd frames."""
        if self.stage == "backbone":
            return (0,)
        if self.stage == "stage1":
            return tuple(range(1, self.num_frames))
        return tuple(range(1, self.num_frames, 2))

    @property
    def sampling_order(self) -> tuple[int, ...]:
        """Order frames are laid out when sampling (stage 2: given frames first, e.g. 0,2,4,1,3)."""
        return self.given_frames + tuple(f for f in range(self.num_frames) if f not in self.given_frames)

    # ---- validation -----------------------------------------------------------------
    def validate(self, tensor_parallel: int = 1) -> "ModelConfig":
        def bad(key: str, why: str):
            raise ValueError(f"model.{key}: {why}")

        if self.stage not in STAGES:
            bad("stage", f"{self.stage!r} is not one of {STAGES}")
        for key in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "text_length",
            "frame_size",
            "frame_tokens",
            "num_frames",
            "window_size",
        ):
            if getattr(self, key) <= 0:
                bad(key, f"must be positive, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            bad("num_heads", f"{self.num_heads} does not divide hidden_size={self.hidden_size}")
        if self.frame_size % self.frame_tokens:
            bad("frame_tokens", f"{self.frame_tokens} does not divide frame_size={self.frame_size}")
        if self.stage == "backbone" and self.num_frames != 1:
            bad("num_frames", f"a backbone models one frame, got {self.num_frames}")
        if self.stage == "stage2":
            if self.num_frames < 3 or self.num_frames % 2 == 0:
                bad(
                    "num_frames",
                    f"stage 2 interleaves given and new frames: needs an odd count >= 3, got {self.num_frames}",
                )
            if self.frame_tokens % self.window_size:
                bad("window_size", f"{self.window_size} does not divide frame_tokens={self.frame_tokens}")
            if not 0 <= self.window_shift < self.window_size:
                bad(
                    "window_shift", f"must be in [0, window_size={self.window_size}), got {self.window_shift}"
                )
        self._check_positions()
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                bad(key, f"must be in [0, 1), got {getattr(self, key)}")
        self._check_splits(tensor_parallel)
        return self

    def _check_positions(self) -> None:
        """The text takes positions 0..text_length-1 and a frame the rows from position_offset on:
        both must fit the table. Explicit settings that do not fit get one message naming every key
        to change (unset, they follow model.text_length)."""
        for key in ("image_position_offset", "max_position_embeddings"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"model.{key}: must be positive, got {getattr(self, key)}")
        offset = max(self.position_offset, self.text_length)
        fixes = {}
        if self.position_offset < self.text_length:
            fixes["image_position_offset"] = offset
        if (
            self.max_position_embeddings is not None
            and self.max_position_embeddings < offset + self.tokens_per_frame
        ):
            fixes["max_position_embeddings"] = offset + self.tokens_per_frame
        if not fixes:
            return
        settings = ", ".join(
            f"model.{key}={getattr(self, key)}"
            for key in ("image_position_offset", "max_position_embeddings")
        )
        raise ValueError(
            f"model.text_length={self.text_length}: the text's positions 0..{self.text_length - 1} and a "
            f"frame's {self.tokens_per_frame} positions do not fit {settings}; set "
            + " ".join(f"model.{key}={value}" for key, value in fixes.items())
            + " (or set none of them: they follow model.text_length); a position table of another "
            "size does not load weights trained with this one"
        )

    def _check_splits(self, tensor_parallel: int) -> None:
        """Heads, FFN and vocabulary split evenly over `tensor_parallel` ranks."""
        if tensor_parallel < 1:
            raise ValueError(f"parallel.tensor_parallel must be >= 1, got {tensor_parallel}")
        for key, size in (
            ("num_heads", self.num_heads),
            ("ffn_hidden_size", self.ffn_size),
            ("vocab.vocab_size", self.vocab.vocab_size),
        ):
            if size % tensor_parallel == 0:
                continue
            why = f"model.{key}: {size} is not divisible by tensor_parallel={tensor_parallel}"
            if key == "vocab.vocab_size":
                multiple = math.lcm(128, tensor_parallel)  # rows in multiples of 128, as Megatron pads
                padded = -(-size // multiple) * multiple
                why += (
                    f"; pad the vocabulary (unused rows), e.g. model.vocab.vocab_size={padded}; pad existing "
                    f"weights with `cogvideo-convert reshard|import-sat|zero ... --vocab-size {padded}`"
                )
            raise ValueError(why)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _cogview2(**changes) -> ModelConfig:
    base = ModelConfig(
        name="cogview2-6b",
        stage="backbone",
        num_layers=48,
        hidden_size=3072,
        num_heads=48,
        vocab=VocabLayout.icetk(),
        text_length=64,
        frame_size=160,
        frame_tokens=20,
        num_frames=1,
        image_position_offset=512,  # the release's: text up to 512 tokens, frames from 512
        max_position_embeddings=1024,
        window_size=10,
        window_shift=5,
        hidden_dropout=0.1,
        attention_dropout=0.1,  # SAT's defaults, which the release trained with
    )
    return base.replace(**changes)


PRESETS = {
    "tiny": lambda: ModelConfig(),
    "tiny-stage2": lambda: ModelConfig(name="tiny-stage2", stage="stage2"),
    "small": lambda: ModelConfig(
        name="small",
        stage="stage1",
        num_layers=4,
        hidden_size=256,
        num_heads=4,
        vocab=VocabLayout.compact(512, 1000),
        text_length=16,
        frame_size=32,
        frame_tokens=4,
        num_frames=5,
        window_size=2,
        window_shift=1,
        train_backbone=True,
    ),
    "small-stage2": lambda: PRESETS["small"]().replace(name="small-stage2", stage="stage2"),
    "cogview2-6b": _cogview2,
    "cogvideo-stage1": lambda: _cogview2(name="cogvideo-stage1", stage="stage1", num_frames=5),
    "cogvideo-stage2": lambda: _cogview2(name="cogvideo-stage2", stage="stage2", num_frames=5),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]().validate()


def preset_setting(name: str) -> ModelConfig:
    """:func:`get_preset` for a command's ``preset`` setting: an unknown name is a ConfigError."""
    try:
        return get_preset(name)
    except ValueError as err:
        raise ConfigError(f"preset: {err}") from None

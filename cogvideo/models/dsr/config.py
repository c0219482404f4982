"""CogView2's direct super-resolution (DSR): its config and presets.

The layout of one sequence (THUDM/CogVideo `sr_pipeline/dsr_model.py`, `DirectSuperResolution`):
`text_length` text slots (left pads, then the text), the low-res frame's `frame_tokens**2` codes,
then `high_frame_tokens**2` high-res slots, each fed as `<start_of_image>` (or, with
`high_slots=low_res`, its low-res cell's code); the logits at
high-res slot j give high-res code j. The published shape is `[96, 496, 4096]` (20 x 20 -> 60 x 60).
"""

from __future__ import annotations

from dataclasses import dataclass

from cogvideo.models.cogvideo.config import ModelConfig, _cogview2
from cogvideo.vocab import VocabLayout

HIGH_SLOTS = ("boi", "low_res")


@dataclass
class DsrConfig(ModelConfig):
    name: str = "dsr-tiny"
    stage: str = "backbone"  # the CogView2 backbone's layers; DSR adds a second attention per layer
    num_frames: int = 1
    text_length: int = 6
    frame_size: int = 16  # low-res pixels per side
    frame_tokens: int = 4  # low-res grid side
    high_frame_tokens: int = 12  # high-res grid side (an integer multiple of frame_tokens)
    image_position_offset: int = 8  # the backbone's image rows (what `reinit` tiles from)
    low_position_offset: int = 9  # position id of low-res code 0 (the release: 513)
    max_position_embeddings: int = 32
    high_window_rows: int = 9  # high-res keys: a box this tall around the query (kernel_size*2-1)
    high_window_cols: int = 5  # and this wide (kernel_size)
    low_window: int = 5  # low-res keys: this square of cells around the query's cell (kernel_size2)
    text_pad_id: int = 0  # the release left-pads the text with token 0 (an image code)
    # what each high-res slot holds: "boi" (the release: `<start_of_image>` everywhere) or
    # "low_res" (a deviation: the code of the low-res cell it lies in, so each slot starts
    # from what it refines instead of finding its cell through attention)
    high_slots: str = "boi"

    # ---- derived shapes -------------------------------------------------------------
    @property
    def scale(self) -> int:
        return self.high_frame_tokens // self.frame_tokens

    @property
    def high_tokens(self) -> int:
        return self.high_frame_tokens**2

    @property
    def high_frame_size(self) -> int:
        return self.frame_size * self.scale

    @property
    def low_start(self) -> int:
        return self.text_length

    @property
    def high_start(self) -> int:
        return self.text_length + self.tokens_per_frame

    @property
    def seq_length(self) -> int:
        return self.high_start + self.high_tokens

    @property
    def window_keys(self) -> int:
        """Keys each high-res query scores: low-res cells, then high-res cells."""
        return self.low_window**2 + self.high_window_rows * self.high_window_cols

    @property
    def loss_frames(self) -> tuple[int, ...]:
        return (0,)

    # ---- validation -----------------------------------------------------------------
    def validate(self, tensor_parallel: int = 1) -> "DsrConfig":
        if self.stage != "backbone" or self.num_frames != 1:
            raise ValueError("model.stage / model.num_frames: DSR super-resolves one frame on the backbone")
        super().validate(tensor_parallel)

        def bad(key: str, why: str):
            raise ValueError(f"model.{key}: {why}")

        if self.high_frame_tokens % self.frame_tokens or self.high_frame_tokens < self.frame_tokens:
            bad(
                "high_frame_tokens",
                f"{self.high_frame_tokens} is not a multiple of frame_tokens={self.frame_tokens}",
            )
        for key in ("high_window_rows", "high_window_cols", "low_window"):
            if getattr(self, key) <= 0 or getattr(self, key) % 2 == 0:
                bad(key, f"must be a positive odd size (centred on the query), got {getattr(self, key)}")
        if self.low_position_offset + self.tokens_per_frame > self.max_position_embeddings:
            bad(
                "low_position_offset",
                f"{self.low_position_offset} + {self.tokens_per_frame} low-res positions exceed "
                f"max_position_embeddings={self.max_position_embeddings}",
            )
        if self.low_position_offset < self.text_length:
            bad("low_position_offset", f"{self.low_position_offset} overlaps the text positions")
        if self.high_slots not in HIGH_SLOTS:
            bad("high_slots", f"{self.high_slots!r} is not one of {list(HIGH_SLOTS)}")
        if not 0 <= self.text_pad_id < self.vocab.vocab_size or self.vocab.is_text(self.text_pad_id):
            bad("text_pad_id", f"{self.text_pad_id} must be a non-text id of the vocabulary")
        return self


def _published(**changes) -> DsrConfig:
    """`cogview2-dsr`: the whole CogView2 backbone plus DSR's layers, 20 x 20 -> 60 x 60 tokens."""
    backbone = _cogview2()
    fields = {k: getattr(backbone, k) for k in backbone.__dataclass_fields__}
    fields.update(
        name="cogview2-dsr",
        text_length=96,
        high_frame_tokens=60,
        low_position_offset=513,
        high_window_rows=9,
        high_window_cols=5,
        low_window=5,
        text_pad_id=0,
    )
    fields.update(changes)
    return DsrConfig(**fields)


PRESETS = {
    "dsr-tiny": lambda: DsrConfig(),  # tests: 4 x 4 -> 12 x 12
    # CPU shape on the demo's `small` backbone (4 x 4 codes of 32 px frames -> 12 x 12 at 96 px)
    "dsr-small": lambda: DsrConfig(
        name="dsr-small",
        num_layers=4,
        hidden_size=256,
        num_heads=4,
        vocab=VocabLayout.compact(512, 1000),
        text_length=16,
        frame_size=32,
        frame_tokens=4,
        high_frame_tokens=12,
        image_position_offset=16,
        low_position_offset=16,
        max_position_embeddings=32,
    ),
    "cogview2-dsr": _published,
}

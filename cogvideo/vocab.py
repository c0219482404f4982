"""The vocabulary layout: which token ids are image codes, text pieces and special tokens.

This module is the only owner of that layout. Everything that builds sequences, masks
logits or decodes samples asks a :class:`VocabLayout` instead of using constants.

Layout (icetk's, used by CogView2 and CogVideo)::

    [0, num_image_tokens)                          image codes of the VQ tokenizer
    [text_offset, text_offset + num_text_tokens)   SentencePiece pieces (id + text_offset)
    then the special tokens, in SPECIAL_TOKENS order
    padding up to vocab_size (kept divisible for tensor-parallel vocab splits)
"""

from __future__ import annotations

from dataclasses import dataclass

SPECIAL_TOKENS = ("<start_of_image>", "<start_of_english>", "<start_of_chinese>")
TEXT_PAD_PIECE = "<pad>"
SEPARATOR_PIECE = "<n>"


@dataclass(frozen=True)
class VocabLayout:
    num_image_tokens: int
    num_text_tokens: int
    text_offset: int
    vocab_size: int
    pad_piece_id: int = 3  # SentencePiece id of TEXT_PAD_PIECE

    def __post_init__(self):
        if self.num_image_tokens <= 0 or self.num_text_tokens <= 0:
            raise ValueError(f"vocab: token counts must be positive, got {self}")
        if self.text_offset < self.num_image_tokens:
            raise ValueError(
                f"vocab.text_offset={self.text_offset} overlaps the image range [0, {self.num_image_tokens})"
            )
        if self.vocab_size < self.min_vocab_size:
            raise ValueError(f"vocab.vocab_size={self.vocab_size} < {self.min_vocab_size} ids in use")
        if not 0 <= self.pad_piece_id < self.num_text_tokens:
            raise ValueError(f"vocab.pad_piece_id={self.pad_piece_id} outside the text model")

    @property
    def min_vocab_size(self) -> int:
        return self.text_offset + self.num_text_tokens + len(SPECIAL_TOKENS)

    def special_id(self, name: str) -> int:
        if name not in SPECIAL_TOKENS:
            raise KeyError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self.text_offset + self.num_text_tokens + SPECIAL_TOKENS.index(name)

    @property
    def boi_id(self) -> int:
        return self.special_id("<start_of_image>")

    @property
    def pad_id(self) -> int:
        return self.text_offset + self.pad_piece_id

    def text_id(self, piece_id: int) -> int:
        return self.text_offset + piece_id

    def piece_id(self, token_id: int) -> int:
        return token_id - self.text_offset

    def is_image(self, token_id: int) -> bool:
        return 0 <= token_id < self.num_image_tokens

    def is_text(self, token_id: int) -> bool:
        return self.text_offset <= token_id < self.text_offset + self.num_text_tokens

    @classmethod
    def icetk(cls) -> "VocabLayout":
        """icetk: 20000 image codes, 130000 text pieces from id 20000 (pad = 20003), vocab 150010."""
        return cls(
            num_image_tokens=20000,
            num_text_tokens=130000,
            text_offset=20000,
            vocab_size=150010,
            pad_piece_id=3,
        )

    @classmethod
    def compact(
        cls, num_image_tokens: int, num_text_tokens: int, multiple: int = 64, pad_piece_id: int = 0
    ) -> "VocabLayout":
        """A small layout for CPU-scale models: text right after the image codes,
        vocab padded to a multiple of `multiple` so it splits evenly over TP ranks."""
        used = num_image_tokens + num_text_tokens + len(SPECIAL_TOKENS)
        vocab = -(-used // multiple) * multiple
        return cls(
            num_image_tokens=num_image_tokens,
            num_text_tokens=num_text_tokens,
            text_offset=num_image_tokens,
            vocab_size=vocab,
            pad_piece_id=pad_piece_id,
        )

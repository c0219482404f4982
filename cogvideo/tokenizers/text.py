"""Text tokenizer: a SentencePiece model whose piece ids are shifted into the model vocabulary.

Model id = SentencePiece id + ``layout.text_offset`` (icetk's convention). The model file is
either icetk's ``ice_text.model`` (taken from a local directory, never downloaded) or one
trained on your own captions with :func:`train_text_tokenizer` /
``cogvideo-train-text-tokenizer``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from cogvideo.shards import DEFAULT_PREFIX_TEMPLATE, compose_text
from cogvideo.vocab import SEPARATOR_PIECE, TEXT_PAD_PIECE, VocabLayout

ICETK_TEXT_MODEL = "ice_text.model"
# Characters of the duration prefix ("4.0秒<n>"); kept as whole pieces even when the
# captions never contain them.
PREFIX_CHARS = "0123456789.秒"


def resolve_text_model(model_file_or_dir: str | Path) -> Path:
    """A SentencePiece file, or a directory holding icetk's ``ice_text.model``."""
    path = Path(model_file_or_dir).expanduser()
    if path.is_dir():
        path = path / ICETK_TEXT_MODEL
    if not path.is_file():
        raise FileNotFoundError(
            f"text tokenizer model not found: {path} (icetk's {ICETK_TEXT_MODEL} is never downloaded "
            f"here: copy it there, or train one with cogvideo-train-text-tokenizer)")
    return path


class TextTokenizer:
    """SentencePiece pieces mapped to model ids ``piece + layout.text_offset``."""

    def __init__(self, model_file_or_dir: str | Path, layout: VocabLayout):
        self.path = resolve_text_model(model_file_or_dir)
        self.layout = layout
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{self.path}: not a SentencePiece model ({err})") from err
        num_pieces = self.sp.GetPieceSize()
        if num_pieces > layout.num_text_tokens:
            raise ValueError(f"{self.path}: {num_pieces} pieces do not fit the layout's "
                             f"num_text_tokens={layout.num_text_tokens}")
        pad_piece = self.sp.IdToPiece(layout.pad_piece_id)
        if pad_piece != TEXT_PAD_PIECE:
            raise ValueError(f"{self.path}: piece {layout.pad_piece_id} is {pad_piece!r}, but the layout's "
                             f"pad_piece_id expects {TEXT_PAD_PIECE!r}")

    @property
    def num_pieces(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return [self.layout.text_id(piece) for piece in self.sp.EncodeAsIds(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Model ids -> text; padding is skipped, any other non-text id is an error."""
        pieces = []
        for token in ids:
            token = int(token)
            if token == self.layout.pad_id:
                continue
            piece = self.layout.piece_id(token)
            if not 0 <= piece < self.num_pieces:
                first = self.layout.text_offset
                raise ValueError(f"token id {token} is not a text id: expected [{first}, {first + self.num_pieces})")
            pieces.append(piece)
        return self.sp.DecodeIds(pieces)

    def encode_prompt(self, caption: str, duration: float, template: str = DEFAULT_PREFIX_TEMPLATE,
                      max_length: int | None = None) -> list[int]:
        """The multi-frame-rate text ("4.0秒<n>caption" by default) as model ids."""
        ids = self.encode(compose_text(caption, duration, template))
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"prompt is {len(ids)} tokens, expected at most {max_length}: {caption[:60]!r}")
        return ids


def _read_captions(captions: list[str] | str | Path) -> list[str]:
    if isinstance(captions, (str, Path)):
        path = Path(captions)
        if not path.is_file():
            raise FileNotFoundError(f"caption file not found: {path}")
        captions = path.read_text(encoding="utf-8").splitlines()
    lines = [line.strip() for line in captions if line.strip()]
    if not lines:
        raise ValueError("no captions to train the text tokenizer on")
    return lines


def train_text_tokenizer(captions: list[str] | str | Path, out_prefix: str | Path, vocab_size: int,
                         model_type: str = "unigram", byte_fallback: bool = True) -> Path:
    """Train a SentencePiece model compatible with ``VocabLayout.compact`` (pad = piece 0).

    Pieces: 0 ``<pad>``, 1 ``<unk>``, 2 ``<n>``, then (with byte fallback) the 256 byte
    pieces, then learned pieces. Full character coverage, so Chinese captions keep every
    character; byte fallback covers characters never seen in training. ``vocab_size`` is an
    upper bound: a small caption set yields fewer pieces. Returns ``<out_prefix>.model``.
    """
    lines = _read_captions(captions)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(lines), model_prefix=str(out_prefix), vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, byte_fallback=byte_fallback,
        pad_id=0, pad_piece=TEXT_PAD_PIECE, unk_id=1, bos_id=-1, eos_id=-1,
        user_defined_symbols=[SEPARATOR_PIECE], required_chars=PREFIX_CHARS,
        normalization_rule_name="identity", hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return out_prefix.with_name(out_prefix.name + ".model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a SentencePiece text tokenizer from a caption file "
                                                 "(one caption per line, UTF-8).")
    parser.add_argument("--captions", required=True, help="caption file, one per line")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True, help="upper bound on the number of pieces")
    parser.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"))
    parser.add_argument("--no-byte-fallback", action="store_true", help="unknown characters become <unk>")
    args = parser.parse_args(argv)
    path = train_text_tokenizer(args.captions, args.out, args.vocab_size, args.model_type,
                                byte_fallback=not args.no_byte_fallback)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    print(f"wrote {path}: {sp.GetPieceSize()} pieces (use VocabLayout.compact(num_image_tokens, "
          f"{sp.GetPieceSize()}) or larger)")


if __name__ == "__main__":
    main()

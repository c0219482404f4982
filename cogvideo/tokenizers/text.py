"""Text tokenizer: a SentencePiece model whose piece ids are shifted into the model vocabulary.

Model id = SentencePiece id + ``layout.text_offset`` (icetk's convention). The model file is
either icetk's ``ice_text.model`` (taken from a local directory, never downloaded) or one
trained on your own captions with :func:`train_text_tokenizer` /
``cogvideo-train-text-tokenizer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import sentencepiece as spm

from cogvideo.captions import CaptionRow, CaptionsFileError, read_captions, usable_captions
from cogvideo.configio import ConfigError, config_parser, parse_config
from cogvideo.family import any_preset
from cogvideo.family_spec import TextModelConfig
from cogvideo.text_format import RELEASE_FRAME_RATES, TextFormat
from cogvideo.tokenizers.icetk_files import ICETK_TEXT_MODEL, resolve_icetk_file
from cogvideo.vocab import SEPARATOR_PIECE, TEXT_PAD_PIECE, VocabLayout


def resolve_text_model(model_file_or_dir: str | Path) -> Path:
    """A SentencePiece file, or a directory holding icetk's ``ice_text.model``."""
    return resolve_icetk_file(
        model_file_or_dir,
        ICETK_TEXT_MODEL,
        "text tokenizer model",
        "train one with cogvideo-train-text-tokenizer",
    )


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
            raise ValueError(
                f"{self.path}: {num_pieces} pieces do not fit the layout's "
                f"num_text_tokens={layout.num_text_tokens}"
            )
        pad_piece = self.sp.IdToPiece(layout.pad_piece_id)
        if pad_piece != TEXT_PAD_PIECE:
            raise ValueError(
                f"{self.path}: piece {layout.pad_piece_id} is {pad_piece!r}, but the layout's "
                f"pad_piece_id expects {TEXT_PAD_PIECE!r}"
            )

    @property
    def num_pieces(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        """Text -> model ids. The parts around each separator "<n>" are encoded on their own, as
        the release builds its texts (encode("4.0秒") + [<n>] + encode(caption)): each part then
        starts like a sentence (SentencePiece's "▁" prefix), as the released models were fed."""
        separator = self.sp.PieceToId(SEPARATOR_PIECE)
        if separator == self.sp.unk_id():  # a model without the piece: one pass, as SentencePiece splits it
            return [self.layout.text_id(piece) for piece in self.sp.EncodeAsIds(text)]
        pieces = []
        for i, part in enumerate(text.split(SEPARATOR_PIECE)):
            pieces += ([separator] if i else []) + (self.sp.EncodeAsIds(part) if part else [])
        return [self.layout.text_id(piece) for piece in pieces]

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
                raise ValueError(
                    f"token id {token} is not a text id: expected [{first}, {first + self.num_pieces})"
                )
            pieces.append(piece)
        separator = self.sp.PieceToId(SEPARATOR_PIECE)
        parts, part = [], []
        for piece in pieces:  # the inverse of encode: each part decoded on its own
            if piece == separator:
                parts.append(part)
                part = []
            else:
                part.append(piece)
        return SEPARATOR_PIECE.join(self.sp.DecodeIds(p) for p in [*parts, part])


def _read_captions(captions: list[str] | str | Path) -> list[str]:
    """Captions from a list, or a file as cogvideo.captions reads it (one per line, or the caption
    column of the CSV / JSONL captions file that ``cogvideo-prep --captions`` reads); rows without a
    usable caption are left out."""
    if isinstance(captions, (str, Path)):
        if not Path(captions).is_file():
            raise FileNotFoundError(f"caption file not found: {captions}")
        captions = [row.caption for row in usable_captions(read_captions(captions, need_paths=False))[0]]
    lines = [line.strip() for line in captions if line.strip()]
    if not lines:
        raise ValueError("no captions to train the text tokenizer on")
    return lines


def caption_lengths(
    encode: Callable[[str], list[int]],
    rows: list[CaptionRow],
    num_frames: int,
    text_format: TextFormat = TextFormat(),
) -> list[tuple[int, CaptionRow]]:
    """(text tokens, row) per usable caption, longest first: the caption as training composes it,
    with the longest duration prefix of the release's frame rates for `num_frames` frames."""
    durations = [(num_frames - 1) / fps for fps in RELEASE_FRAME_RATES] if num_frames > 1 else [None]
    lengths = [
        (max(len(encode(text_format.text(row.caption, d))) for d in durations), row)
        for row in usable_captions(rows)[0]
    ]
    return sorted(lengths, key=lambda item: -item[0])


def unusable_line(rows: list[CaptionRow], named: int = 3) -> list[str]:
    """One line naming the rows left out for having no usable caption, if any."""
    bad = usable_captions(rows)[1]
    if not bad:
        return []
    listed = ", ".join(f"{row.where} ({row.problem})" for row in bad[:named])
    return [
        f"left out: {len(bad)} row(s) without a usable caption: {listed}{' ...' if len(bad) > named else ''}"
    ]


def length_report(lengths: list[tuple[int, CaptionRow]], cfg: TextModelConfig, named: int = 3) -> list[str]:
    """The caption-length distribution in text tokens against the model's text budget, naming the
    longest rows that do not fit and the model.text_length that holds every caption."""
    if not lengths:
        return ["caption lengths: no usable captions"]
    tokens = np.array([n for n, _ in lengths])
    over = [(n, row) for n, row in lengths if n > cfg.text_length]
    lines = [
        f"caption lengths in text tokens (duration prefix included) over {len(tokens)} captions: median "
        f"{np.median(tokens):g}, 90th percentile {np.percentile(tokens, 90):g}, longest {tokens.max()}",
        f"model.text_length={cfg.text_length} (preset {cfg.name}) holds {len(tokens) - len(over)} of {len(tokens)} "
        f"({100 * (len(tokens) - len(over)) / len(tokens):.0f} %)",
    ]
    if over:
        listed = "; ".join(f"{row.where}: {n} tokens" for n, row in over[:named])
        lines.append(
            f"longer: {listed}{' ...' if len(over) > named else ''}; train with model.text_length={tokens.max()} to "
            f"hold every caption (the positions after the text follow it), or shorten them"
        )
    return lines


def preset_of_any_family(name: str):
    """The `preset` setting of the text tokenizer commands: any family's preset (the pieces must
    fit its vocab.num_text_tokens); an unknown name is a ConfigError."""
    try:
        return any_preset(name)
    except ValueError as err:
        raise ConfigError(f"preset: {err}") from None


def train_text_tokenizer(
    captions: list[str] | str | Path,
    out_prefix: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    byte_fallback: bool = True,
    character_coverage: float = 1.0,
    *,
    preset: str,
) -> Path:
    """Train a SentencePiece model compatible with ``VocabLayout.compact`` (pad = piece 0) for the
    model preset ``preset``, recorded with what was fitted in ``<out_prefix>.json``.

    Pieces: 0 ``<pad>``, 1 ``<unk>``, 2 ``<n>``, then (with byte fallback) the 256 byte
    pieces, then learned pieces. ``character_coverage`` 1.0 keeps every character of the
    captions as a piece; below it the rarest characters are left out (byte fallback still
    encodes them), which a vocabulary smaller than the captions' character set needs.
    ``vocab_size`` is an upper bound: a small caption set yields fewer pieces.
    Returns ``<out_prefix>.model``.
    """
    num_text_tokens = preset_of_any_family(preset).vocab.num_text_tokens
    lines = _read_captions(captions)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(lines),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        pad_id=0,
        pad_piece=TEXT_PAD_PIECE,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=[SEPARATOR_PIECE],
        required_chars=TextFormat().required_chars(),
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    model = out_prefix.with_name(out_prefix.name + ".model")
    metadata = {
        "format": "cogvideo-text-tokenizer",
        "preset": preset,
        "pieces": spm.SentencePieceProcessor(model_file=str(model)).GetPieceSize(),
        "num_text_tokens": num_text_tokens,
        "vocab_size": vocab_size,
        "character_coverage": character_coverage,
        "captions": str(captions) if isinstance(captions, (str, Path)) else f"{len(lines)} captions",
    }
    metadata_path(model).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
    return model


def metadata_path(model_file: str | Path) -> Path:
    """What ``cogvideo-train-text-tokenizer`` fitted, next to the model: ``PREFIX.json``."""
    return Path(model_file).with_suffix(".json")


def check_fits(model_file: str | Path, cfg: TextModelConfig, key: str) -> TextTokenizer:
    """The text tokenizer, loaded against ``cfg``'s vocabulary; ValueError naming ``key``, the
    piece count, the preset it was trained for (when recorded) and the command that fixes it."""
    try:
        return TextTokenizer(model_file, cfg.vocab)
    except (FileNotFoundError, ValueError) as err:
        trained = ""
        meta = metadata_path(model_file)
        if Path(model_file).is_file() and meta.is_file():
            trained = f" (trained for preset {json.loads(meta.read_text()).get('preset')!r}, {meta})"
        raise ValueError(
            f"{key}: {err}{trained}; train one for this model with "
            f"cogvideo-train-text-tokenizer preset={cfg.name} captions=... out=..."
        ) from None


@dataclass
class TextTokenizerConfig:
    preset: str = "small"  # model preset whose text vocabulary (vocab.num_text_tokens) the pieces must fit
    captions: str = ""  # one caption per line, or the CSV / JSONL captions file of cogvideo-prep
    out: str = ""  # output prefix: writes PREFIX.model, PREFIX.vocab and PREFIX.json (what was fitted)
    vocab_size: int = 0  # upper bound on the pieces; 0: the preset's vocab.num_text_tokens
    # bpe learns whole words from a few hundred captions, where unigram (icetk's kind) still splits
    # them into letters; unigram for large caption sets
    model_type: Literal["unigram", "bpe"] = "bpe"
    byte_fallback: bool = True  # characters without a piece become UTF-8 byte pieces (else <unk>)
    # fraction of the captions' characters kept as pieces, 0.98 to 1: lower it (e.g. 0.9995) when the
    # captions hold more distinct characters than vocab_size (many Chinese captions, small vocab)
    character_coverage: float = 1.0

    def model_config(self) -> TextModelConfig:
        return preset_of_any_family(self.preset)

    def __post_init__(self):
        for key in ("captions", "out"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: required, e.g. captions=captions.csv out=tok/text")
        limit = self.model_config().vocab.num_text_tokens
        if not 0 <= self.vocab_size <= limit:
            raise ConfigError(
                f"vocab_size: {self.vocab_size} pieces do not fit preset {self.preset!r} "
                f"(vocab.num_text_tokens={limit}); give at most {limit}, or 0 for all of them"
            )
        if not 0.98 <= self.character_coverage <= 1:  # SentencePiece's own bounds
            raise ConfigError(
                f"character_coverage: expected a fraction in [0.98, 1], got {self.character_coverage}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(
        TextTokenizerConfig,
        "cogvideo-train-text-tokenizer",
        "Train a SentencePiece text tokenizer for a model preset from its captions.",
    )
    cfg, _ = parse_config(TextTokenizerConfig, parser, argv)
    vocab_size = cfg.vocab_size or cfg.model_config().vocab.num_text_tokens
    try:
        path = train_text_tokenizer(
            cfg.captions,
            cfg.out,
            vocab_size,
            cfg.model_type,
            byte_fallback=cfg.byte_fallback,
            character_coverage=cfg.character_coverage,
            preset=cfg.preset,
        )
    except FileNotFoundError as err:
        parser.exit(2, f"{parser.prog}: captions: {err}\n")
    except CaptionsFileError as err:
        parser.exit(2, f"{parser.prog}: captions: {err}\n")
    except (ValueError, RuntimeError) as err:  # SentencePiece reports bad settings as RuntimeError
        reason = str(err).strip().splitlines()[-1].split("] ")[-1].split(" Increase vocab_size")[0]
        hint = (
            f"; lower character_coverage (now {cfg.character_coverage}, e.g. character_coverage=0.9995) or "
            f"raise vocab_size (now {vocab_size})"
            if "required_chars" in reason
            else ""
        )
        parser.exit(2, f"{parser.prog}: SentencePiece: {reason}{hint}\n")
    pieces = json.loads(metadata_path(path).read_text())["pieces"]
    print(
        f"wrote {path}: {pieces} pieces, fits preset {cfg.preset!r} (vocab.num_text_tokens="
        f"{cfg.model_config().vocab.num_text_tokens}); train with data.text_tokenizer={path}"
    )
    model = cfg.model_config()
    rows = read_captions(cfg.captions, need_paths=False)
    for line in unusable_line(rows) + length_report(
        caption_lengths(TextTokenizer(path, model.vocab).encode, rows, model.num_frames), model
    ):
        print(line)


if __name__ == "__main__":
    main()

import itertools
import json

import pytest
import sentencepiece as spm

from cogvideo.models.cogvideo.config import get_preset
from cogvideo.text_format import TextFormat, TextFormatError
from cogvideo.tokenizers.text import ICETK_TEXT_MODEL, TextTokenizer, main, train_text_tokenizer
from cogvideo.vocab import VocabLayout

COLOURS = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
MOVES = {"left": "向左", "right": "向右", "up": "向上", "down": "向下"}


def captions() -> list[str]:
    out = []
    for (c, zc), (s, zs), (m, zm) in itertools.product(COLOURS.items(), SHAPES.items(), MOVES.items()):
        out += [f"a {c} {s} moving {m}", f"一个{zc}的{zs}{zm}移动"]
    return out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return train_text_tokenizer(
        captions(), tmp_path_factory.mktemp("sp") / "captions", vocab_size=600, preset="small"
    )


@pytest.fixture(scope="module")
def tokenizer(model_file):
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return TextTokenizer(model_file, VocabLayout.compact(512, sp.GetPieceSize()))


@pytest.mark.parametrize(
    "text",
    [
        "a red circle moving left",
        "一个蓝色的三角形向上移动",
        "紫色正方形，向右！",  # full-width punctuation is kept (no NFKC)
        "a 猫 never seen in training 🐱",  # byte fallback
    ],
)
def test_round_trip_english_and_chinese(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(tokenizer.layout.is_text(i) for i in ids)
    assert tokenizer.decode(ids) == text


def test_ids_are_sentencepiece_ids_plus_offset(tokenizer, model_file):
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    text = "一个红色的圆形向左移动 and a green square"
    assert tokenizer.encode(text) == [512 + i for i in sp.EncodeAsIds(text)]
    assert "<unk>" not in sp.EncodeAsPieces("a 猫 🐱")


def test_trained_model_matches_compact_layout(tokenizer):
    sp, layout = tokenizer.sp, tokenizer.layout
    assert sp.IdToPiece(layout.pad_piece_id) == "<pad>"
    assert tokenizer.decode([layout.pad_id] * 3 + tokenizer.encode("a red circle")) == "a red circle"
    assert sp.GetPieceSize() <= 600


def test_prompt_has_duration_prefix_with_separator_piece(tokenizer):
    ids = tokenizer.encode(TextFormat().text("一个红色的圆形", 4.0))
    pieces = [tokenizer.sp.IdToPiece(tokenizer.layout.piece_id(i)) for i in ids]
    assert "<n>" in pieces and "秒" in pieces
    assert tokenizer.decode(ids) == "4.0秒<n>一个红色的圆形"  # the published "4.0秒<n>{caption}"
    # the release (cogvideo_pipeline.py): encode(str(float(duration)) + "秒") + [tokenizer['<n>']] + encode(text)
    separator = tokenizer.layout.text_id(tokenizer.sp.PieceToId("<n>"))
    assert ids == tokenizer.encode("4.0秒") + [separator] + tokenizer.encode("一个红色的圆形")
    assert tokenizer.encode("a red circle") == [
        tokenizer.layout.text_id(p) for p in tokenizer.sp.EncodeAsIds("a red circle")
    ]
    custom = TextFormat(prefix_template="{caption} ({duration:.0f}s)")
    assert tokenizer.decode(tokenizer.encode(custom.text("a red circle", 2.0))) == "a red circle (2s)"
    for bad in ("{duration}秒<n>", "{caption} {fps}", "{caption"):
        with pytest.raises(TextFormatError, match="prefix_template"):
            TextFormat(prefix_template=bad)


def test_decode_rejects_non_text_ids(tokenizer):
    with pytest.raises(ValueError, match=r"token id 5 is not a text id: expected \[512, "):
        tokenizer.decode([5])
    with pytest.raises(ValueError, match="not a text id"):
        tokenizer.decode([tokenizer.layout.boi_id])


def test_icetk_style_model_loads_from_directory(tmp_path):
    # icetk's ice_text.model puts <pad> at piece 3 (model id 20003) and has a <n> piece.
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(captions()),
        model_prefix=str(tmp_path / "ice_text"),
        vocab_size=200,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=["<n>"],
        required_chars="0123456789.秒",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    tokenizer = TextTokenizer(tmp_path, VocabLayout.icetk())
    assert tokenizer.path == tmp_path / ICETK_TEXT_MODEL
    ids = tokenizer.encode(TextFormat().text("a red circle moving left", 4.0))
    assert min(ids) >= 20000 and tokenizer.layout.pad_id == 20003
    assert tokenizer.decode(ids) == "4.0秒<n>a red circle moving left"


def test_missing_or_bad_model_files_are_named(tmp_path, model_file):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / ICETK_TEXT_MODEL}"):
        TextTokenizer(tmp_path, VocabLayout.icetk())
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a SentencePiece model"):
        TextTokenizer(junk, VocabLayout.icetk())
    with pytest.raises(ValueError, match="do not fit the layout's num_text_tokens=10"):
        TextTokenizer(model_file, VocabLayout.compact(512, 10))
    with pytest.raises(ValueError, match="piece 3 is .* expects '<pad>'"):
        TextTokenizer(model_file, VocabLayout.icetk())


def test_command_trains_from_caption_file(tmp_path, capsys):
    caption_file = tmp_path / "captions.txt"
    caption_file.write_text("\n".join(captions()) + "\n\n", encoding="utf-8")
    main(["preset=small", f"captions={caption_file}", f"out={tmp_path / 'out' / 'sp'}", "vocab_size=500"])
    printed = capsys.readouterr().out
    assert "fits preset 'small'" in printed and "data.text_tokenizer=" in printed  # config keys, not Python
    tokenizer = TextTokenizer(tmp_path / "out" / "sp.model", VocabLayout.compact(64, 500))
    assert tokenizer.decode(tokenizer.encode("一个黄色的正方形向下移动")) == "一个黄色的正方形向下移动"
    fitted = json.loads((tmp_path / "out" / "sp.json").read_text())
    assert (
        fitted["preset"] == "small" and fitted["pieces"] == tokenizer.num_pieces <= fitted["num_text_tokens"]
    )
    with pytest.raises(SystemExit) as exit:
        main(
            ["preset=small", f"captions={tmp_path / 'nowhere.txt'}", f"out={tmp_path / 'x'}", "vocab_size=50"]
        )
    assert exit.value.code == 2 and "nowhere.txt" in capsys.readouterr().err


def test_command_reads_the_prep_captions_file_and_defaults_to_the_presets_vocabulary(tmp_path, capsys):
    rows = [{"path": f"v{i}.mp4", "caption": c} for i, c in enumerate(captions())]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    main(["preset=small", f"captions={tmp_path / 'captions.jsonl'}", f"out={tmp_path / 'sp'}"])
    fitted = json.loads((tmp_path / "sp.json").read_text())
    assert fitted["vocab_size"] == get_preset("small").vocab.num_text_tokens >= fitted["pieces"]
    with pytest.raises(SystemExit) as exit:
        main(
            [
                "preset=tiny",
                f"captions={tmp_path / 'captions.jsonl'}",
                f"out={tmp_path / 'x'}",
                "vocab_size=5000",
            ]
        )
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "vocab_size: 5000 pieces do not fit preset 'tiny'" in err


def test_command_learns_whole_words_from_a_few_dozen_captions(tmp_path):
    from cogvideo.synthetic import COLOURS as WORLD_COLOURS
    from cogvideo.synthetic import DIRECTIONS, caption_for
    from cogvideo.synthetic import SHAPES as WORLD_SHAPES

    combos = list(itertools.product(WORLD_COLOURS, WORLD_SHAPES, DIRECTIONS))[::3]  # 24 captions
    (tmp_path / "captions.txt").write_text("\n".join(caption_for(*c) for c in combos), encoding="utf-8")
    main(["preset=small", f"captions={tmp_path / 'captions.txt'}", f"out={tmp_path / 'sp'}"])
    tokenizer = TextTokenizer(tmp_path / "sp.model", get_preset("small").vocab)
    for caption in map(lambda c: caption_for(*c), combos):  # one piece per word (SentencePiece's "▁word")
        assert len(tokenizer.encode(caption)) == len(caption.split()), tokenizer.sp.EncodeAsPieces(caption)


def test_small_vocabulary_over_many_characters_needs_and_takes_character_coverage(tmp_path, capsys):
    # 100 frequent and 300 rare CJK characters: with byte fallback's 256 pieces, all of them
    # cannot be pieces of a 500-piece vocabulary; coverage 0.98 leaves the rare ones to bytes
    common, rare = [chr(0x4E00 + i) for i in range(100)], [chr(0x5000 + i) for i in range(300)]
    lines = [
        "".join(common[(i * 7 + k) % 100] for k in range(50)) + (rare[i] if i < 300 else "")
        for i in range(600)
    ]
    (tmp_path / "captions.txt").write_text("\n".join(lines), encoding="utf-8")
    args = [
        "preset=small",
        f"captions={tmp_path / 'captions.txt'}",
        f"out={tmp_path / 'sp'}",
        "vocab_size=500",
    ]
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "character_coverage=" in err and len(err.strip().splitlines()) == 1
    main(args + ["character_coverage=0.98"])
    tokenizer = TextTokenizer(tmp_path / "sp.model", get_preset("small").vocab)
    assert tokenizer.num_pieces <= 500 and tokenizer.decode(tokenizer.encode(lines[0])) == lines[0]

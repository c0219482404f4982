"""One knob for caption length: `model.text_length=N` alone moves the positions that follow the text
(as the release lays them out: text 0..N-1, a frame's tokens from the image offset on); explicit
settings that conflict get one message naming every key to change; the training check names the
longest captions and the tokens each needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset as wds

from cogvideo.configio import ConfigError
from cogvideo.family import build_model, resolve_model_section
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.sequence import TokenMeta, position_ids
from cogvideo.shards import ClipMeta, encode_sample
from pretrain.config import DataConfig, check_config, load_train_config
from pretrain.data import DataError, check_text_length


def test_presets_derive_the_positions_they_used_to_spell_out():
    """The small presets' former explicit values (offset = text length, table = offset + one frame)
    are what the derivation gives: their checkpoints keep their shapes."""
    assert (get_preset("tiny").position_offset, get_preset("tiny").position_rows) == (8, 24)
    assert (get_preset("small").position_offset, get_preset("small").position_rows) == (16, 32)
    released = get_preset("cogvideo-stage1")
    assert (released.position_offset, released.position_rows) == (512, 1024)


def test_text_length_alone_moves_the_frame_positions_like_the_release():
    cfg = resolve_model_section({"preset": "small", "text_length": 24})
    assert (cfg.position_offset, cfg.position_rows) == (24, 24 + 16)
    n_real = 5  # left-padded: 19 pads, then 5 text tokens
    meta = TokenMeta.layout(cfg, [0, 1])
    text_pad = torch.zeros(1, meta.frame.numel(), dtype=torch.bool)
    text_pad[0, : cfg.text_length - n_real] = True
    backbone_row, _ = position_ids(cfg, meta, text_pad)
    # the release: real text tokens 0..n-1 (pads 0, masked out), frame tokens image_offset + i
    expected = [0] * (cfg.text_length - n_real) + list(range(n_real)) + [24 + i for i in range(16)] * 2
    assert backbone_row[0].tolist() == expected
    model = build_model(cfg.replace(num_layers=1, hidden_size=32))
    assert model.position_embeddings.weight.shape[0] == 40
    tokens = torch.randint(0, cfg.vocab.num_image_tokens, (1, cfg.seq_length))
    assert torch.isfinite(model(tokens)).all()


def test_conflicting_explicit_positions_name_every_key_to_change_in_one_message():
    with pytest.raises(ValueError) as err:  # the released layout: frames from 512 in 1024 rows
        resolve_model_section({"preset": "cogvideo-stage1", "text_length": 700})
    message = str(err.value)
    assert "\n" not in message
    assert "set model.image_position_offset=700 model.max_position_embeddings=1100 (or" in message
    with pytest.raises(
        ValueError, match=r"set model.image_position_offset=600 \(or"
    ):  # 1024 rows hold 600 + 400
        resolve_model_section({"preset": "cogvideo-stage1", "text_length": 600})
    with pytest.raises(ValueError, match=r"set model.image_position_offset=24 \(or set none"):
        resolve_model_section({"preset": "small", "text_length": 24, "image_position_offset": 16})
    with pytest.raises(ValueError, match=r"set model.max_position_embeddings=32 \(or set none"):
        resolve_model_section({"preset": "small", "max_position_embeddings": 20})
    fixed = resolve_model_section(
        {
            "preset": "cogvideo-stage1",
            "text_length": 700,
            "image_position_offset": 700,
            "max_position_embeddings": 1100,
        }
    )
    assert (fixed.position_offset, fixed.position_rows) == (700, 1100)


def test_the_training_check_reports_the_conflict_as_one_config_line():
    cfg = load_train_config(
        None,
        ["model.preset=small", "model.text_length=24", "model.max_position_embeddings=32", "data.shards=[x]"],
    )
    with pytest.raises(ConfigError, match="model.max_position_embeddings=40"):
        check_config(cfg, world_size=1, has_gpu=False)


def _shards_with_captions(root, captions: list[str]) -> str:
    cfg = get_preset("tiny")
    path = str(root / "shard-000.tar")
    with wds.TarWriter(path) as sink:
        for i, caption in enumerate(captions):
            frames = np.zeros((cfg.num_frames, cfg.frame_tokens, cfg.frame_tokens), np.int64)
            meta = ClipMeta(4.0, 1.0, 1, f"videos/clip{i}.mp4", 0.0, 4.0, cfg.num_frames)
            sink.write(encode_sample(f"k{i}", {"frames": frames}, caption, meta))
    return path


def test_the_caption_check_names_the_longest_captions_and_the_text_length_that_holds_them(tmp_path):
    """One token per character (the stand-in tokenizer): "4.0秒<n>" is 7 characters."""
    captions = ["ab", "a much longer caption", "cd", "the longest caption of them all", "ef"]
    shard = _shards_with_captions(tmp_path, captions)
    cfg = get_preset("tiny").replace(text_length=12)
    data = DataConfig(max_cut_text=0.05)
    with pytest.raises(DataError) as err:
        check_text_length([shard], cfg, lambda text: list(text), data)
    message = str(err.value)
    longest, second = 7 + len(captions[3]), 7 + len(captions[1])
    assert (
        f"2 of 5 sampled captions are longer than model.text_length=12 tokens (longest {longest})" in message
    )
    assert (
        f"{shard} sample k3 (video videos/clip3.mp4): {longest} tokens; "
        f"{shard} sample k1 (video videos/clip1.mp4): {second} tokens" in message
    )
    assert f"set model.text_length={longest}" in message
    summary = check_text_length([shard], cfg.replace(text_length=longest), lambda text: list(text), data)
    assert summary.startswith("0 of 5 sampled captions")


# ---- the caption-length distribution, before any training ------------------------------------

LONG = "a busy city street where people ride bikes past shops and parked cars"


def captions_file(tmp_path):
    rows = [
        ("a.mp4", "a red circle moving left"),
        ("b.mp4", LONG),
        ("c.mp4", "a blue square moving up"),
        ("d.mp4", " "),
    ]
    path = tmp_path / "captions.csv"
    path.write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in rows), encoding="utf-8")
    return path


def test_the_text_tokenizer_command_and_params_print_caption_lengths_against_the_budget(tmp_path, capsys):
    from cogvideo.params import main as params_main
    from cogvideo.tokenizers.text import TextTokenizer
    from cogvideo.tokenizers.text import main as text_main

    path = captions_file(tmp_path)
    text_main(["preset=small", f"captions={path}", f"out={tmp_path / 'text'}"])
    printed = capsys.readouterr().out
    small = get_preset("small")
    encode = TextTokenizer(tmp_path / "text.model", small.vocab).encode
    # the hand count: the caption as training composes it, with the longest duration prefix (5 frames at
    # 0.25 fps: 16 s)
    tokens = {
        c: len(encode(f"16.0秒<n>{c}")) for c in ("a red circle moving left", LONG, "a blue square moving up")
    }
    assert tokens[LONG] > small.text_length >= max(n for c, n in tokens.items() if c != LONG)
    assert f"over 3 captions: median {sorted(tokens.values())[1]}, 90th percentile" in printed
    assert f"longest {tokens[LONG]}" in printed
    assert "model.text_length=16 (preset small) holds 2 of 3 (67 %)" in printed
    assert f"left out: 1 row(s) without a usable caption: {path}:5 (empty_caption)" in printed
    assert f"longer: {path}:3: {tokens[LONG]} tokens; train with model.text_length={tokens[LONG]}" in printed
    params_main(["small", "tiny", "--captions", str(path), "--text-tokenizer", str(tmp_path / "text.model")])
    printed = capsys.readouterr().out
    assert (
        f"  longer: {path}:3: {tokens[LONG]} tokens; train with model.text_length={tokens[LONG]}" in printed
    )
    assert "tiny: not measured: --text-tokenizer:" in printed  # its 96-piece vocabulary is another

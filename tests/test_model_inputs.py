"""Bad input is refused with a ValueError saying what was expected."""

import pytest
import torch

from cogvideo.family import build_model
from cogvideo.models.cogvideo.config import get_preset
from cogvideo.models.cogvideo.sequence import build_sequence


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny")).eval()


def test_sequence_longer_than_layout(model):
    cfg = model.cfg
    too_long = torch.zeros(1, cfg.seq_length + cfg.tokens_per_frame, dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit the layout"):
        model(too_long)
    with pytest.raises(ValueError, match="does not fit the layout"):
        model(torch.zeros(1, cfg.text_length + 3, dtype=torch.long))


def test_token_ids_outside_vocabulary(model):
    tokens = torch.full((1, model.cfg.seq_length), model.cfg.vocab.vocab_size)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 192\)"):
        model(tokens)


def test_frames_of_wrong_size_and_codes():
    cfg = get_preset("tiny")
    text = [cfg.vocab.text_offset + 1]
    with pytest.raises(ValueError, match=r"frames must be \[5, 4, 4\]"):
        build_sequence(cfg, text, torch.zeros(5, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="frame codes must be in"):
        build_sequence(cfg, text, torch.full((5, 4, 4), cfg.vocab.num_image_tokens))
    with pytest.raises(ValueError, match="text_length=8"):
        build_sequence(cfg, [cfg.vocab.text_offset] * 9, torch.zeros(5, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="text ids must be in"):
        build_sequence(cfg, [3], torch.zeros(5, 4, 4, dtype=torch.long))


def test_build_sequence_layout_and_loss_frames():
    for preset, loss_frames in (("tiny", [1, 2, 3, 4]), ("tiny-stage2", [1, 3])):
        cfg = get_preset(preset)
        frames = (
            torch.arange(cfg.num_frames * cfg.tokens_per_frame).reshape(cfg.num_frames, 4, 4)
            % cfg.vocab.num_image_tokens
        )
        tokens, targets, mask = build_sequence(cfg, [cfg.vocab.text_offset + 5], frames)
        T, n = cfg.text_length, cfg.tokens_per_frame
        assert (tokens[: T - 1] == cfg.vocab.pad_id).all() and tokens[T - 1] == cfg.vocab.text_offset + 5
        for f in range(cfg.num_frames):
            block = slice(T + f * n, T + (f + 1) * n)
            assert tokens[block][0] == cfg.vocab.boi_id
            assert torch.equal(tokens[block][1:], frames[f].flatten()[:-1])
            assert torch.equal(targets[block], frames[f].flatten())
            assert bool(mask[block].all()) == (f in loss_frames) and bool(mask[block].any()) == (
                f in loss_frames
            )
        assert not mask[:T].any()


def test_config_validation_names_the_key():
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="model.num_heads"):
        cfg.replace(num_heads=3).validate()
    with pytest.raises(ValueError, match="model.num_heads: 4 is not divisible by tensor_parallel=8"):
        cfg.validate(tensor_parallel=8)
    # icetk's 150010 ids split over no power of two: the error says how to pad, the config and the weights
    with pytest.raises(
        ValueError,
        match=r"model.vocab.vocab_size: 150010 .* model.vocab.vocab_size=150016; .* --vocab-size 150016`$",
    ):
        get_preset("cogvideo-stage1").validate(tensor_parallel=8)
    with pytest.raises(ValueError, match="model.window_size"):
        get_preset("tiny-stage2").replace(window_size=3).validate()

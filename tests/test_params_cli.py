"""`cogvideo-params` shows each preset's geometry: what the tokenizers and captions must fit."""

from __future__ import annotations

import pytest

from cogvideo.models.cogvideo.config import get_preset
from cogvideo.params import main


def test_each_preset_row_shows_frame_size_codes_text_length_and_vocabularies(capsys):
    main(["small", "tiny", "cogvideo-stage1"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:4]}
    for name, row in rows.items():
        cfg = get_preset(name)
        assert row[2:8] == [
            f"{cfg.frame_size}px",
            f"{cfg.frame_tokens}x{cfg.frame_tokens}",
            str(cfg.num_frames),
            str(cfg.text_length),
            str(cfg.vocab.num_image_tokens),
            str(cfg.vocab.num_text_tokens),
        ]
    assert rows["small"][2:8] == ["32px", "4x4", "5", "16", "512", "1000"]


def test_an_unknown_preset_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["huge"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "unknown preset 'huge'" in err and len(err.strip().splitlines()) == 1

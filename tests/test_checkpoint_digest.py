"""Corruption is found, not trained on: the digests a training checkpoint records in COMPLETE
name every flipped, truncated, missing or unreadable file; `--resume auto` falls back to the
newest checkpoint that is whole and says what it skipped; a named checkpoint, a binary
`latest` or a broken train_config.yaml is one line. (The trainer's own use, on 2 ranks with
real bit flips, is in test_pretrain_signals.py.)"""

from __future__ import annotations

import os

import pytest

from cogvideo.checkpoint import CheckpointError
from cogvideo.checkpoint.digest import deal, folder_files, record_folder, verify_folder
from cogvideo.checkpoint.training import (
    COMPLETE,
    read_complete,
    resume_candidates,
    tag_dir,
    tag_for,
    verify_tag,
    write_complete,
)


def flip(path, offset: int | None = None, count: int = 16) -> None:
    """Invert `count` bytes in the middle of a file (as a failing disk or a stray write would)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def make_tag(root, step: int, legacy: bool = False):
    """A complete checkpoint folder of a few files (one in a sub-folder), as the trainer marks it."""
    path = root / tag_for(step)
    (path / "engine").mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(os.urandom(5000))
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(20000))
    (path / "engine" / "extra_part.pt").write_bytes(os.urandom(300))
    (path / "train_config.yaml").write_text("model:\n  preset: tiny\nparallel:\n  precision: fp32\n")
    if legacy:
        (path / COMPLETE).write_text("")
    else:
        write_complete(path, record_folder(path, exclude=[COMPLETE]))
    (root / "latest").write_text(path.name)
    return path


def test_every_file_is_recorded_and_each_kind_of_damage_is_named(tmp_path):
    tag = make_tag(tmp_path, 4)
    record = read_complete(tag)
    assert sorted(record["files"]) == sorted(folder_files(tag, exclude=[COMPLETE]))
    assert "engine/extra_part.pt" in record["files"] and verify_tag(tag) == []
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip(optim)
    assert verify_tag(tag) == [
        f"{optim}: contents differ from the sha256 digest recorded when the checkpoint "
        "was completed (corrupted on disk or rewritten)"
    ]
    flip(optim)  # flipped back: whole again
    assert verify_tag(tag) == []
    (tag / "engine" / "extra_part.pt").write_bytes(b"short")
    (tag / "mp_rank_00_model_states.pt").unlink()
    (tag / "train_config.yaml").unlink()
    (tag / "train_config.yaml").mkdir()  # cannot be read as a file
    problems = verify_tag(tag)
    assert len(problems) == 3
    assert any(
        "mp_rank_00_model_states.pt: missing (the checkpoint recorded 5000 bytes)" in p for p in problems
    )
    assert any("extra_part.pt: 5 bytes, the checkpoint recorded 300 (truncated" in p for p in problems)
    assert any("train_config.yaml: " in p for p in problems)


def test_a_flip_in_any_file_is_found_wherever_it_lies(tmp_path):
    """Sharp: every byte position class (start, middle, end) of every recorded file."""
    tag = make_tag(tmp_path, 2)
    record = read_complete(tag)
    for name, entry in record["files"].items():
        for offset in (0, entry["bytes"] // 2, entry["bytes"] - 1):
            flip(tag / name, offset, 1)
            assert [p.split(": ")[0] for p in verify_folder(tag, record)] == [str(tag / name)]
            flip(tag / name, offset, 1)
    assert verify_folder(tag, record) == []


def test_shares_cover_every_file_once_with_balanced_bytes():
    sizes = {f"f{i}": (i * 7919) % 1000 + 1 for i in range(50)}
    shares = deal(sizes, 4)
    assert sorted(n for share in shares for n in share) == sorted(sizes)
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert deal(sizes, 4) == shares and deal({"a": 1}, 3) == [["a"], [], []]


def test_resume_auto_falls_back_past_damaged_checkpoints_and_says_why(tmp_path):
    for step in (2, 4, 6):
        make_tag(tmp_path, step)
    (tmp_path / tag_for(6) / "mp_rank_00_model_states.pt").write_bytes(b"cut")
    (tmp_path / tag_for(4) / COMPLETE).write_bytes(os.urandom(64))
    # binary, yet printable once undecodable bytes are replaced (U+FFFD): random bytes were that 1 time in 10
    (tmp_path / "latest").write_bytes(bytes(range(0x80, 0x90)) + b"\xff")
    found, notes = resume_candidates(tmp_path, "auto")
    assert found == [tmp_path / tag_for(2)]
    assert len(notes) == 3 and "latest: does not name a checkpoint folder" in notes[0]
    assert (
        f"skipping {tmp_path / tag_for(6)}: " in notes[1]
        and "3 bytes, the checkpoint recorded 5000" in notes[1]
    )
    assert f"skipping {tmp_path / tag_for(4)}: " in notes[2] and "COMPLETE: not a digest record" in notes[2]
    with pytest.raises(
        CheckpointError, match=r"checkpoint.resume: .*step00000006/mp_rank_00_model_states.pt: 3 bytes"
    ) as err:
        resume_candidates(tmp_path, str(tmp_path / tag_for(6)))
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="does not name a checkpoint folder"):
        tag_dir(tmp_path, None)  # what the converter reads when no tag is given
    (tmp_path / tag_for(2) / "engine" / "extra_part.pt").unlink()
    with pytest.raises(
        CheckpointError, match=r"no checkpoint in .* is whole \(.*step00000006.*step00000004.*step00000002"
    ):
        resume_candidates(tmp_path, "auto")
    assert resume_candidates(tmp_path / "empty", "auto") == (
        [],
        [f"--resume auto: no complete checkpoint in {tmp_path / 'empty'}; starting from step 0"],
    )


def test_a_checkpoint_from_before_digests_is_still_checked_for_a_readable_config(tmp_path):
    legacy = make_tag(tmp_path, 2, legacy=True)
    assert read_complete(legacy) is None and resume_candidates(tmp_path, "auto")[0] == [legacy]
    (legacy / "train_config.yaml").write_bytes(b"model: {preset: [tiny\n\xff\xfe")
    with pytest.raises(CheckpointError, match=r"train_config.yaml: unreadable \("):
        resume_candidates(tmp_path, str(legacy))
    with pytest.raises(CheckpointError, match="no checkpoint in .* is whole"):
        resume_candidates(tmp_path, "auto")


def test_the_callers_own_check_skips_like_a_damaged_file(tmp_path):
    make_tag(tmp_path, 2)
    make_tag(tmp_path, 4)

    def check(path):
        if path.name == tag_for(4):
            raise CheckpointError(f"{path}/loader_dp1.pt: missing")

    found, notes = resume_candidates(tmp_path, "auto", check)
    assert found == [tmp_path / tag_for(2)] and "loader_dp1.pt: missing" in notes[-1]
